"""The services every pipeline step uses (settings, database, ports) and small shared look-ups."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.config.settings import Settings
from lesiontrack.db.models import Instance, Series, Study
from lesiontrack.db.session import session_scope
from lesiontrack.pipeline.jobs.analysis import JobContext
from lesiontrack.pipeline.jobs.contract import AnalysisState, FollowupRecord
from lesiontrack.pipeline.jobs.ports import PriorSource, ResultSender
from lesiontrack.pipeline.jobs.store import PermanentError
from lesiontrack.pipeline.science.prompt_selection import time_key as time_key  # one key for the steps


@dataclass
class PipelineServices:
    settings: Settings
    session_factory: sessionmaker[Session]
    prior_source: PriorSource | None
    sender: ResultSender | None

    @property
    def results_root(self) -> Path:
        return Path(self.settings.data_dir) / "results"

    def new_state(self) -> AnalysisState:
        """The in-memory state of one attempt (the job runner's ``state_factory``)."""
        return AnalysisState()


Ctx = JobContext[PipelineServices, AnalysisState]
"""What every pipeline step receives."""


@dataclass(frozen=True)
class FollowupSeries:
    """The follow-up series of a job as the database knows it, with its instance files in order."""

    record: FollowupRecord
    files: list[Path]


def followup_series(sf: sessionmaker[Session], series_uid: str) -> FollowupSeries:
    with session_scope(sf) as s:
        row = s.execute(
            select(Series, Study)
            .join(Study, Series.study_pk == Study.id)
            .where(Series.series_instance_uid == series_uid)
        ).first()
        if row is None:
            raise PermanentError(f"follow-up series {series_uid} is not in the database")
        series, study = row
        files = [
            Path(i.file_path)
            for i in s.scalars(
                select(Instance).where(Instance.series_pk == series.id).order_by(Instance.instance_number, Instance.id)
            )
        ]
        record = FollowupRecord(
            series_uid=series_uid,
            study_uid=study.study_instance_uid,
            study_date=study.study_date,
            study_time=study.study_time,
            patient_pk=study.patient_pk,
            modality=series.modality,
        )
        return FollowupSeries(record, files)
