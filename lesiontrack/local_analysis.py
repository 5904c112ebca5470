"""One analysis behind every door: folders of DICOM analysed as jobs of the service, in an embedded store.

:func:`analyse_folders` is what ``lesiontrack track`` runs (and what any other door analysing folders should run):
the given folders are ingested through the Storage SCP's ingest and indexer into a temporary data folder with its
own SQLite database, every series is completed (routing decision recorded), and each follow-up CT, oldest first,
becomes an analysis job run by the service's own :class:`pipeline.jobs.analysis.AnalysisService` with the steps of
:func:`pipeline.jobs.steps.build_pipeline` — match_priors, retrieve_priors, load_volumes, register, track,
detect_new_lesions, measure, write_seg_sr, send (nothing is sent: the embedded store has no destinations). Priors
come from the local prior source (:class:`dicom_node.outbound.priors.PriorFinder` on the embedded store, peers never
queried); a prompts JSON given for the baseline takes the place of its SEG/SR (:class:`PromptFilePriors`). A
follow-up a person confirmed is taken in after its analysis like a reader's correction arriving at the service
(:func:`pipeline.jobs.verification.take_in_series`), adopted, and the later follow-ups are propagated from it.
So both doors write the same objects: SEG, TID 1500 SR, OHIF measurements SR, lesions, candidates, flags.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.config.settings import Settings
from lesiontrack.db.models import JobState, RoutingDecision, Series, Study
from lesiontrack.db.session import session_scope
from lesiontrack.dicom_node.database import open_database
from lesiontrack.dicom_node.inbound.completion import complete_series
from lesiontrack.dicom_node.inbound.ingest import Ingestor, ingest_file
from lesiontrack.dicom_node.inbound.scp import storage_root
from lesiontrack.dicom_node.inbound.storage import InstanceStore
from lesiontrack.dicom_node.outbound.priors import PriorFinder
from lesiontrack.pipeline.jobs.analysis import AnalysisService
from lesiontrack.pipeline.jobs.contract import AnalysisState, JobResults, job_results
from lesiontrack.pipeline.jobs.ports import PROMPT_FILE, PriorAnnotation, PriorTimepoint
from lesiontrack.pipeline.jobs.steps import build_pipeline
from lesiontrack.pipeline.jobs.verification import take_in_series
from lesiontrack.service import build_analysis_service

log = logging.getLogger(__name__)

ACTOR = "track"
CONFIRMED_BY = "lesiontrack track --confirmed^"  # the verifier of a --confirmed folder without ContentCreatorName (PN)
ANNOTATION_MODALITIES = ("SEG", "SR")
NOT_IMAGES = (*ANNOTATION_MODALITIES, "PR", "KO", "RTSTRUCT")
Progress = Callable[[str, str], None]
"""``progress(series_uid, message)``: a job's step starting, or how it ended."""


class FolderError(ValueError):
    """A given folder cannot be analysed (no CT series, an instance refused); names the folder or file."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path


@dataclass
class FolderSeries:
    """What one given folder holds once ingested: its CT series and its annotation series."""

    folder: Path
    ct_series_uid: str
    study_uid: str
    study_date: str | None
    study_time: str | None
    patient_pk: int
    annotation_series: list[str] = field(default_factory=list)
    routing: str = ""  # the routing decision's reason when the CT series was not routed to analysis


@dataclass
class TimepointRun:
    """One timepoint of a local analysis: the baseline, or a follow-up and the job(s) that analysed it."""

    folder: Path
    series_uid: str
    study_uid: str
    study_date: str | None
    baseline: bool = False
    confirmed: bool = False
    job_ids: list[int] = field(default_factory=list)
    state: JobState | None = None  # of its latest job (None: the baseline, or not routed to analysis)
    reason: str | None = None  # why it was not analysed / failed
    results: JobResults | None = None  # its latest job's recorded outputs
    analysis: AnalysisState | None = None  # its latest job's in-memory state (lesions with masks, candidates)


@dataclass
class LocalAnalysis:
    """Everything one local run produced; the store stays readable until its folder is removed."""

    settings: Settings
    session_factory: sessionmaker[Session]
    patient_pk: int
    timepoints: list[TimepointRun]  # oldest first

    @property
    def baseline_index(self) -> int:
        return next(i for i, tp in enumerate(self.timepoints) if tp.baseline)


class PromptFilePriors:
    """The local prior source with a prompts JSON in place of the SEG/SR of one CT series (``track --prompts``)."""

    def __init__(self, finder: PriorFinder, prompt_file: Path | None, on: FolderSeries) -> None:
        self.finder, self.prompt_file, self.on = finder, prompt_file, on

    def find_priors(self, followup_series_uid: str) -> list[PriorTimepoint]:
        priors = self.finder.find_priors(followup_series_uid)
        if self.prompt_file is None:
            return priors
        others = [p for p in priors if p.ct_series_uid != self.on.ct_series_uid]
        with session_scope(self.finder.session_factory) as s:
            fu = s.execute(
                select(Study.patient_pk, Study.study_instance_uid, Study.study_date, Study.study_time)
                .join(Series, Series.study_pk == Study.id)
                .where(Series.series_instance_uid == followup_series_uid)
            ).first()
        if fu is None or fu.patient_pk != self.on.patient_pk or fu.study_instance_uid == self.on.study_uid:
            return others
        key = (self.on.study_date or "", self.on.study_time or "")
        if not fu.study_date or key >= (fu.study_date, fu.study_time or ""):
            return others  # the prompts are on a later (or undated) timepoint: not a prior of this follow-up
        data = self.prompt_file.read_bytes()
        uid = "2.25." + str(int(hashlib.sha256(data).hexdigest()[:30], 16))
        prompt = PriorAnnotation(uid, "", PROMPT_FILE, [self.prompt_file.resolve()])
        tp = PriorTimepoint(
            self.on.study_uid, self.on.study_date, self.on.study_time, self.on.ct_series_uid, [], [prompt], "local"
        )
        return [*others, tp]

    def retrieve(self, prior: PriorTimepoint) -> PriorTimepoint:
        return self.finder.retrieve(prior)


def local_settings(settings: Settings, data_dir: Path) -> Settings:
    """The user's settings on an embedded store: own data folder and SQLite database, no PACS peers queried and no
    destinations (nothing leaves the machine), one attempt per job (a transient failure is reported, not waited on)."""
    local = settings.model_copy(deep=True)
    local.data_dir = data_dir
    local.database_url = None
    local.pacs = []
    local.sending.destinations = []
    local.worker.max_attempts = 1
    local.dicom.fsync = False
    return local


def analyse_folders(
    settings: Settings,
    *,
    baseline: Path,
    followups: Sequence[Path],
    store_dir: Path,
    prompts: Path | None = None,
    confirmed: Sequence[Path] = (),
    progress: Progress | None = None,
) -> LocalAnalysis:
    """Analyse ``followups`` against the annotations on ``baseline`` exactly as the service would (see the module
    docstring); the embedded store is created in ``store_dir`` (kept: the caller removes it)."""
    local = local_settings(settings, store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    sf = open_database(local, upgrade_db=True, require_writable=True)
    ingestor = Ingestor(InstanceStore(storage_root(local), fsync=False), sf, actor=ACTOR)
    try:
        folders = [_ingest_folder(ingestor, sf, d) for d in [baseline, *followups]]
        for uid in _all_series(folders):
            complete_series(sf, local.routing, uid, None, forced=True, actor=ACTOR)
        for f in folders:
            f.routing = _not_routed(sf, f.ct_series_uid)
        base = folders[0]
        confirmed_set = {c.resolve() for c in confirmed}
        for c in confirmed_set:
            if c not in {f.folder.resolve() for f in folders[1:]} or c == base.folder.resolve():
                raise FolderError(c, "--confirmed: not one of the --followup folders")
        finder = PriorFinder(local, sf, ingestor=ingestor, query_peers=False)
        analysis = build_analysis_service(
            local, sf, build_pipeline, kind=ACTOR, ports=(PromptFilePriors(finder, prompts, base), None)
        )
        states = _keep_states(analysis)
        runs = [
            TimepointRun(
                f.folder,
                f.ct_series_uid,
                f.study_uid,
                f.study_date,
                baseline=i == 0,
                confirmed=f.folder.resolve() in confirmed_set,
            )
            for i, f in enumerate(folders)
        ]
        order = sorted(range(len(folders)), key=lambda i: (folders[i].study_date or "", folders[i].study_time or "", i))
        ordered = [(runs[i], folders[i]) for i in order]
        runs = [runs[i] for i in order]
        for run, folder in ordered:
            if run.baseline:
                continue
            if folder.routing:
                run.reason = f"not analysed: {folder.routing}"
                continue
            job = analysis.store.create(run.series_uid, reason="lesiontrack track", actor=ACTOR)
            _run(analysis, job, run, states, progress)
            if run.confirmed:
                _take_in_confirmed(analysis, sf, local, folder, run, states, progress)
        return LocalAnalysis(local, sf, base.patient_pk, runs)
    finally:
        ingestor.close()


def _keep_states(analysis: AnalysisService) -> list[AnalysisState]:
    """The in-memory state of every attempt the service starts (label maps are drawn from their masks)."""
    made: list[AnalysisState] = []
    factory = analysis.state_factory

    def new_state() -> AnalysisState:
        state = factory()
        if not isinstance(state, AnalysisState):
            raise TypeError(f"the analysis service's state factory made a {type(state).__name__}")
        made.append(state)
        return state

    analysis.state_factory = new_state
    return made


def _run(
    analysis: AnalysisService,
    job: int,
    run: TimepointRun,
    states: list[AnalysisState],
    progress: Progress | None,
) -> None:
    before = len(states)
    analysis.progress = (lambda _job, message: progress(run.series_uid, message)) if progress is not None else None
    state = analysis.run(job)
    view = analysis.store.get(job)
    run.job_ids.append(job)
    run.state = state if state is not None else view.state
    run.reason = view.error
    run.results = job_results(view.step_outputs)
    run.analysis = states[-1] if len(states) > before else None


def _take_in_confirmed(
    analysis: AnalysisService,
    sf: sessionmaker[Session],
    settings: Settings,
    folder: FolderSeries,
    run: TimepointRun,
    states: list[AnalysisState],
    progress: Progress | None,
) -> None:
    """A confirmed follow-up's SEG/SR arrives like a reader's correction of our result: adopted by its own job."""
    if run.state is not JobState.DONE:
        raise FolderError(folder.folder, f"--confirmed: the follow-up was not analysed ({run.reason or run.state})")
    if not folder.annotation_series:
        raise FolderError(folder.folder, "--confirmed: the folder holds no SEG or SR")
    jobs = [
        job
        for uid in folder.annotation_series
        for job in take_in_series(sf, settings.verification, uid, actor=ACTOR, operator=CONFIRMED_BY, vouched=True)
    ]
    if not jobs:
        raise FolderError(folder.folder, "--confirmed: its SEG/SR annotates none of the follow-up's lesions' series")
    for job in jobs:
        _run(analysis, job, run, states, progress)


def _all_series(folders: list[FolderSeries]) -> list[str]:
    return list(dict.fromkeys(uid for f in folders for uid in (f.ct_series_uid, *f.annotation_series)))


def _not_routed(sf: sessionmaker[Session], series_uid: str) -> str:
    with session_scope(sf) as s:
        series = s.scalar(select(Series).where(Series.series_instance_uid == series_uid))
        if series is None or series.routing_decision is RoutingDecision.ANALYSE:
            return ""
        return series.routing_reason or f"routing decision {series.routing_decision.value}"


def _is_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _ingest_folder(ingestor: Ingestor, sf: sessionmaker[Session], folder: Path) -> FolderSeries:
    """Every DICOM file of ``folder`` stored and indexed as if received; its CT series (the one with most images)."""
    series: dict[str, int] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and _is_dicom(p)):
        res = ingest_file(ingestor, path, calling_ae=ACTOR)
        if not res.ok or res.series_uid is None:
            raise FolderError(path, f"not taken in: {res.comment or f'status 0x{res.status:04X}'}")
        series[res.series_uid] = series.get(res.series_uid, 0) + 1
    with session_scope(sf) as s:
        rows = [
            (se, st)
            for se, st in s.execute(
                select(Series, Study)
                .join(Study, Series.study_pk == Study.id)
                .where(Series.series_instance_uid.in_(list(series)))
            )
        ]
        images = [(se, st) for se, st in rows if (se.modality or "").upper() not in NOT_IMAGES]
        if not images:
            raise FolderError(folder, "no CT series found")
        ct, study = max(images, key=lambda r: series[r[0].series_instance_uid])
        return FolderSeries(
            folder,
            ct.series_instance_uid,
            study.study_instance_uid,
            study.study_date,
            study.study_time,
            study.patient_pk,
            [se.series_instance_uid for se, _st in rows if (se.modality or "").upper() in ANNOTATION_MODALITIES],
        )
