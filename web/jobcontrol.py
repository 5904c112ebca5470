"""What the HTTP API may ask of the job system: retry a job, re-analyse a series.

The app depends only on the :class:`JobControl` protocol; ``lesiontrack serve`` passes a :class:`JobStoreControl`
(built on :class:`pipeline.jobs.store.JobStore`) or any object with the same two methods. Errors: ``KeyError`` (unknown
job/series) becomes 404, ``ValueError`` (e.g. a job that is still running) becomes 409.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from lesiontrack.pipeline.jobs.store import JobStore


class JobControl(Protocol):
    def retry(self, job_id: int) -> int:
        """Re-run a finished job as a new job; returns the new job's id."""
        ...

    def reanalyse(self, series_uid: str) -> int:
        """Queue a fresh analysis of a follow-up series; returns the job id."""
        ...


@dataclass(frozen=True)
class Completion:
    """What an explicit completion trigger did: the routing decision recorded, or nothing new."""

    decision: str
    reason: str
    job_id: int | None = None
    #: remembered, not completed yet: it completes once the instances the PACS sent are indexed (bounded wait)
    pending: bool = False
    indexed: int | None = None
    expected_instances: int | None = None


@runtime_checkable
class SeriesControl(Protocol):
    """Series-level actions that need the DICOM node (the process running the SCP, or its database)."""

    def complete_series(self, series_uid: str, expected_instances: int | None = None) -> Completion | None:
        """The PACS says the series is stable (and, optionally, how many instances it sent): complete it once
        they are indexed — now, or later (``pending``); None = already complete with nothing received since."""
        ...

    def analyse_anyway(self, series_uid: str, actor: str) -> int:
        """Analyse a series the routing rules skipped; returns the job id (KeyError/ValueError as above)."""
        ...


@dataclass(frozen=True)
class CorrectionTaken:
    """What an uploaded corrected SEG/SR did: the series it was stored as, and the adoption jobs queued."""

    series_uid: str
    sop_instance_uid: str
    jobs: list[int]
    detail: str


@runtime_checkable
class CorrectionIntake(Protocol):
    """Store a corrected SEG/SR uploaded on the dashboard as a received instance and take it in (verified
    tracking); needs the DICOM node's store, so only the process that runs it offers this."""

    def take_correction(self, data: bytes, actor: str) -> CorrectionTaken:
        """ValueError: not a DICOM SEG/SR, or not storable (the message says why)."""
        ...


class JobStoreControl:
    """:class:`JobControl` on top of the persisted job state machine."""

    def __init__(self, store: JobStore, actor: str = "api") -> None:
        self.store = store
        self.actor = actor

    def retry(self, job_id: int) -> int:
        return self.store.retry(job_id, actor=self.actor)

    def reanalyse(self, series_uid: str) -> int:
        return self.store.create(series_uid, reason="re-analysis requested over the API", actor=self.actor)
