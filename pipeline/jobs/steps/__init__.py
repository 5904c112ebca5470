"""The analysis steps of one follow-up series, in order (see :func:`build_pipeline`).

match_priors → retrieve_priors → load_volumes → register → track → detect_new_lesions → measure → write_seg_sr
→ send.

Each step is a module of its own; what each records and what they share in memory is the step contract
(:mod:`pipeline.jobs.contract`). Durable steps (match_priors, retrieve_priors, write_seg_sr, send) leave their
results on disk or in the database and record where; a resumed job starts after the last durable step whose
results are still there. The others hold volumes, registrations and masks in :class:`AnalysisState` and are
recomputed when needed. Re-running a step never creates duplicates: write_seg_sr writes into a per-attempt folder,
persists lesions/observations by (lesion, series, job), and send reuses the deliveries already queued for the job.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.config.settings import Settings
from lesiontrack.pipeline.jobs.analysis import Step
from lesiontrack.pipeline.jobs.contract import (
    STEP_NAMES,
    AnalysisState,
    DetectOutput,
    LoadVolumesOutput,
    MatchPriorsOutput,
    MeasureOutput,
    RegisterOutput,
    RetrievePriorsOutput,
    SendOutput,
    TrackOutput,
    WriteSegSrOutput,
)
from lesiontrack.pipeline.jobs.ports import PriorSource, ResultSender
from lesiontrack.pipeline.jobs.steps.detect import detect_new_lesions_step
from lesiontrack.pipeline.jobs.steps.measure import measure
from lesiontrack.pipeline.jobs.steps.priors import match_priors, retrieve_priors
from lesiontrack.pipeline.jobs.steps.register import register
from lesiontrack.pipeline.jobs.steps.results import write_seg_sr
from lesiontrack.pipeline.jobs.steps.send import send
from lesiontrack.pipeline.jobs.steps.services import PipelineServices
from lesiontrack.pipeline.jobs.steps.track import track
from lesiontrack.pipeline.jobs.steps.volumes import load_volumes

__all__ = ["STEP_NAMES", "AnalysisState", "PipelineServices", "build_pipeline", "send"]

PipelineStep = Step[PipelineServices, AnalysisState, Any]
"""A step of this pipeline (the list holds steps of different output models)."""


def build_pipeline(
    settings: Settings,
    session_factory: sessionmaker[Session],
    prior_source: PriorSource | None = None,
    sender: ResultSender | None = None,
) -> tuple[list[PipelineStep], PipelineServices]:
    """The nine steps and the services they share; the service runs them with ``state_factory=AnalysisState``."""
    steps: list[PipelineStep] = [
        Step(MatchPriorsOutput.step, match_priors, MatchPriorsOutput, durable=True),
        Step(RetrievePriorsOutput.step, retrieve_priors, RetrievePriorsOutput, durable=True),
        Step(LoadVolumesOutput.step, load_volumes, LoadVolumesOutput),
        Step(RegisterOutput.step, register, RegisterOutput),
        Step(TrackOutput.step, track, TrackOutput),
        Step(DetectOutput.step, detect_new_lesions_step, DetectOutput),
        Step(MeasureOutput.step, measure, MeasureOutput),
        Step(WriteSegSrOutput.step, write_seg_sr, WriteSegSrOutput, durable=True),
        Step(SendOutput.step, send, SendOutput, durable=True),
    ]
    return steps, PipelineServices(settings, session_factory, prior_source, sender)
