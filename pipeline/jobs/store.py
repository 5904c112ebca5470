"""Analysis jobs as a persisted state machine: creation, atomic claiming with a lease, transitions, retries.

The database is the source of truth for job state, whatever executor runs the job. Every state change is a
single guarded ``UPDATE ... WHERE state IN (...)`` (so two workers can never both win a transition) plus an
audit event in the same transaction.

States (``db.models.JobState``)::

    queued ──claim──▶ running ──▶ done | nothing_to_track | failed
      ▲                 │  │
      │                 │  └─transient error─▶ retry_wait ──(back-off over)──▶ claimable again
      └──requeue────────┘     (shutdown, or lease expired because the worker died)
    any finished job ──retry──▶ superseded (a NEW job re-runs the series; its objects supersede the old)

``next_retry_at`` is "the moment the job may next be claimed": the end of the back-off in ``retry_wait`` and the
end of the worker's lease in ``running`` (renewed by a heartbeat). A ``running`` job whose lease ran out was left
by a dead worker and is claimable again; so is one whose worker ran on this host under a pid that no longer exists.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.db.models import AnalysisJob, JobState, Series, Study
from lesiontrack.db.repository import audit
from lesiontrack.db.session import affected_rows, session_scope

ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.RETRY_WAIT)
FINISHED_STATES = (JobState.DONE, JobState.NOTHING_TO_TRACK, JobState.FAILED)
DEFAULT_LEASE_SECONDS = 120.0


class JobError(Exception):
    """Base of the outcomes a step can signal to the job runner."""


class TransientError(JobError):
    """Worth retrying later (PACS unreachable, GPU out of memory, ...)."""

    def __init__(self, message: str, *, force_cpu: bool = False) -> None:
        super().__init__(message)
        self.force_cpu = force_cpu


class PermanentError(JobError):
    """Retrying will not help (bad input, unsupported data); the job fails with this readable reason."""


class NothingToTrack(JobError):
    """No prior study or no prior lesions: a recorded outcome, not an error."""


class JobNotFound(KeyError):
    pass


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def worker_identity(kind: str = "worker") -> str:
    """``host:pid:kind:token`` — unique per process start, parseable for the dead-process check."""
    return f"{socket.gethostname()}:{os.getpid()}:{kind}:{uuid.uuid4().hex[:8]}"


def _pid_dead_on_this_host(worker: str | None) -> bool:
    if not worker:
        return False
    parts = worker.split(":")
    if len(parts) < 2 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(frozen=True)
class JobView:
    """A detached snapshot of one job (what CLIs, the demo and tests read)."""

    id: int
    followup_series_uid: str
    state: JobState
    step: str | None
    attempts: int
    error: str | None
    step_timings: dict[str, float]  # step → seconds
    step_outputs: dict[str, object]
    worker: str | None
    superseded_by: int | None
    next_retry_at: datetime | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: AnalysisJob) -> JobView:
        return cls(
            job.id,
            job.followup_series_uid,
            JobState(job.state),
            job.step,
            job.attempts,
            job.error,
            dict(job.step_timings or {}),
            dict(job.step_outputs or {}),
            job.worker,
            job.superseded_by,
            as_utc(job.next_retry_at),
            as_utc(job.created_at),
            as_utc(job.started_at),
            as_utc(job.finished_at),
        )

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES or self.state is JobState.SUPERSEDED


class JobStore:
    """All reads and writes of ``analysis_job`` rows; each method is one transaction."""

    def __init__(self, session_factory: sessionmaker[Session], actor: str = "jobs") -> None:
        self.sf = session_factory
        self.actor = actor

    # -- creation ---------------------------------------------------------------------------------
    def create(
        self,
        series_uid: str,
        *,
        reason: str = "series complete",
        actor: str | None = None,
        supersedes: int | None = None,
    ) -> int:
        """A new queued job for ``series_uid``; an already queued/waiting one for the series is reused."""
        with session_scope(self.sf) as s:
            if supersedes is None:
                existing = s.scalar(
                    select(AnalysisJob)
                    .where(
                        AnalysisJob.followup_series_uid == series_uid,
                        AnalysisJob.state.in_([JobState.QUEUED, JobState.RETRY_WAIT]),
                        AnalysisJob.superseded_by.is_(None),
                    )
                    .order_by(AnalysisJob.id.desc())
                )
                if existing is not None:
                    audit(
                        s,
                        actor or self.actor,
                        "job.retriggered",
                        "job",
                        existing.id,
                        reason=reason,
                        series_uid=series_uid,
                    )
                    return existing.id
            patient_pk = s.scalar(select(Series.study_pk).where(Series.series_instance_uid == series_uid))
            if patient_pk is not None:
                patient_pk = s.scalar(select(Study.patient_pk).where(Study.id == patient_pk))
            job = AnalysisJob(
                followup_series_uid=series_uid,
                patient_pk=patient_pk,
                state=JobState.QUEUED,
                attempts=0,
                step_timings={},
                step_outputs={},
            )
            s.add(job)
            s.flush()
            audit(
                s,
                actor or self.actor,
                "job.created",
                "job",
                job.id,
                series_uid=series_uid,
                reason=reason,
                supersedes=supersedes,
            )
            # Older jobs of the same series are superseded by this one (their objects stay; ours are new).
            older = s.scalars(
                select(AnalysisJob).where(
                    AnalysisJob.followup_series_uid == series_uid,
                    AnalysisJob.id != job.id,
                    AnalysisJob.superseded_by.is_(None),
                )
            ).all()
            for old in older:
                old.superseded_by = job.id
                if old.state in FINISHED_STATES:
                    prev = old.state
                    old.state = JobState.SUPERSEDED
                    audit(
                        s,
                        actor or self.actor,
                        "job.state",
                        "job",
                        old.id,
                        **{"from": prev.value},
                        to=JobState.SUPERSEDED.value,
                        superseded_by=job.id,
                    )
            return job.id

    def retry(self, job_id: int, *, actor: str = "operator") -> int:
        """Re-run a job's series as a new job that supersedes it (the old job and its objects are kept)."""
        with session_scope(self.sf) as s:
            job = s.get(AnalysisJob, job_id)
            if job is None:
                raise JobNotFound(f"no analysis job with id {job_id}")
            if job.state in ACTIVE_STATES:
                raise ValueError(f"job {job_id} is {job.state.value}; only finished jobs can be retried")
            series_uid = job.followup_series_uid
        return self.create(series_uid, reason=f"retry of job {job_id}", actor=actor, supersedes=job_id)

    # -- claiming ---------------------------------------------------------------------------------
    def _claimable(self, now: datetime) -> ColumnElement[bool]:
        return or_(
            AnalysisJob.state == JobState.QUEUED,
            and_(
                AnalysisJob.state == JobState.RETRY_WAIT,
                or_(AnalysisJob.next_retry_at.is_(None), AnalysisJob.next_retry_at <= now),
            ),
            and_(
                AnalysisJob.state == JobState.RUNNING,
                AnalysisJob.next_retry_at.is_not(None),
                AnalysisJob.next_retry_at <= now,
            ),
        )

    def claim(self, job_id: int, worker: str, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> bool:
        """Atomically take ``job_id`` for ``worker``; False when another worker has it or it is not due."""
        now = utcnow()
        with session_scope(self.sf) as s:
            prev = s.execute(select(AnalysisJob.state, AnalysisJob.worker).where(AnalysisJob.id == job_id)).first()
            if prev is None:
                raise JobNotFound(f"no analysis job with id {job_id}")
            res = s.execute(
                update(AnalysisJob)
                .where(AnalysisJob.id == job_id, AnalysisJob.superseded_by.is_(None), self._claimable(now))
                .values(
                    state=JobState.RUNNING,
                    worker=worker,
                    attempts=AnalysisJob.attempts + 1,
                    next_retry_at=now + timedelta(seconds=lease_seconds),
                    started_at=now,
                    error=None,
                )
                .execution_options(synchronize_session=False)
            )
            if affected_rows(res) != 1:
                return False
            details: dict[str, object] = {
                "from": JobState(prev.state).value,
                "to": JobState.RUNNING.value,
                "worker": worker,
            }
            if JobState(prev.state) is JobState.RUNNING:
                details["reason"] = f"lease of worker {prev.worker} expired"
            audit(s, worker, "job.state", "job", job_id, **details)
            return True

    def claimable_ids(self, limit: int = 50) -> list[int]:
        now = utcnow()
        with session_scope(self.sf) as s:
            return list(
                s.scalars(
                    select(AnalysisJob.id)
                    .where(AnalysisJob.superseded_by.is_(None), self._claimable(now))
                    .order_by(AnalysisJob.id)
                    .limit(limit)
                )
            )

    def claim_next(self, worker: str, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> int | None:
        for job_id in self.claimable_ids():
            if self.claim(job_id, worker, lease_seconds):
                return job_id
        return None

    def heartbeat(self, job_id: int, worker: str, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> bool:
        """Extend the lease; False when the job is no longer ours (then the runner must stop)."""
        with session_scope(self.sf) as s:
            res = s.execute(
                update(AnalysisJob)
                .where(AnalysisJob.id == job_id, AnalysisJob.worker == worker, AnalysisJob.state == JobState.RUNNING)
                .values(next_retry_at=utcnow() + timedelta(seconds=lease_seconds))
                .execution_options(synchronize_session=False)
            )
            return affected_rows(res) == 1

    def recover_orphans(self, actor: str) -> list[int]:
        """Requeue running jobs whose worker is gone (dead pid on this host, or lease expired). Run at start-up."""
        now = utcnow()
        requeued: list[int] = []
        with session_scope(self.sf) as s:
            rows = s.execute(
                select(AnalysisJob.id, AnalysisJob.worker, AnalysisJob.next_retry_at).where(
                    AnalysisJob.state == JobState.RUNNING
                )
            ).all()
        for job_id, worker, lease in rows:
            lease = as_utc(lease)
            if _pid_dead_on_this_host(worker):
                reason = f"worker {worker} is no longer running"
            elif lease is not None and lease <= now:
                reason = f"lease of worker {worker} expired"
            else:
                continue
            if self._transition(
                job_id,
                (JobState.RUNNING,),
                JobState.QUEUED,
                actor,
                worker=worker,
                values={"next_retry_at": None, "worker": None},
                reason=reason,
            ):
                requeued.append(job_id)
        return requeued

    # -- progress and outcomes (only the worker holding the job) -----------------------------------
    def _transition(
        self,
        job_id: int,
        from_states: Iterable[JobState],
        to: JobState,
        actor: str,
        *,
        worker: str | None = None,
        values: dict[str, object] | None = None,
        **details: object,
    ) -> bool:
        from_states = tuple(from_states)
        with session_scope(self.sf) as s:
            cond = [AnalysisJob.id == job_id, AnalysisJob.state.in_(from_states)]
            if worker is not None:
                cond.append(AnalysisJob.worker == worker)
            prev = s.scalar(select(AnalysisJob.state).where(AnalysisJob.id == job_id))
            res = s.execute(
                update(AnalysisJob)
                .where(*cond)
                .values(state=to, **(values or {}))
                .execution_options(synchronize_session=False)
            )
            if affected_rows(res) != 1:
                return False
            audit(
                s,
                actor,
                "job.state",
                "job",
                job_id,
                **{"from": JobState(prev).value if prev else None},
                to=to.value,
                **{k: v for k, v in details.items() if v is not None},
            )
            return True

    def superseded_by(self, job_id: int) -> int | None:
        """The newer job of the same series that superseded ``job_id``, if any (set while it may still run)."""
        with session_scope(self.sf) as s:
            return s.scalar(select(AnalysisJob.superseded_by).where(AnalysisJob.id == job_id))

    def stop_superseded(self, job_id: int, worker: str, step: str) -> bool:
        """A running job found superseded stops: ``running`` -> ``superseded``, before the step it was to run."""
        return self._transition(
            job_id,
            (JobState.RUNNING,),
            JobState.SUPERSEDED,
            worker,
            worker=worker,
            values={"finished_at": utcnow(), "next_retry_at": None},
            reason=f"superseded by job {self.superseded_by(job_id)} before step {step}; nothing more is sent",
        )

    def step_started(self, job_id: int, worker: str, step: str) -> None:
        with session_scope(self.sf) as s:
            s.execute(
                update(AnalysisJob)
                .where(AnalysisJob.id == job_id, AnalysisJob.worker == worker)
                .values(step=step)
                .execution_options(synchronize_session=False)
            )
            audit(s, worker, "job.step_started", "job", job_id, step=step)

    def step_finished(
        self, job_id: int, worker: str, step: str, outputs: dict[str, object] | None, seconds: float
    ) -> None:
        """Record a step's outputs and timing (JSON columns are replaced, never mutated in place)."""
        with session_scope(self.sf) as s:
            job = s.get(AnalysisJob, job_id)
            if job is None:
                raise JobNotFound(f"no analysis job with id {job_id}")
            timings = dict(job.step_timings or {})
            timings[step] = round(float(seconds), 4)
            out = dict(job.step_outputs or {})
            out[step] = outputs or {}
            job.step_timings = timings
            job.step_outputs = out
            audit(s, worker, "job.step_finished", "job", job_id, step=step, seconds=round(float(seconds), 3))

    def set_runtime(self, job_id: int, **runtime: str) -> None:
        """Runtime hints kept across attempts (e.g. ``device='cpu'`` after a GPU out-of-memory)."""
        with session_scope(self.sf) as s:
            job = s.get(AnalysisJob, job_id)
            if job is None:
                raise JobNotFound(f"no analysis job with id {job_id}")
            out = dict(job.step_outputs or {})
            out["_runtime"] = {**out.get("_runtime", {}), **runtime}
            job.step_outputs = out

    def forget_outputs(self, job_id: int, steps: Iterable[str]) -> None:
        with session_scope(self.sf) as s:
            job = s.get(AnalysisJob, job_id)
            if job is None:
                raise JobNotFound(f"no analysis job with id {job_id}")
            out = {k: v for k, v in (job.step_outputs or {}).items() if k not in set(steps)}
            job.step_outputs = out

    def finish(self, job_id: int, worker: str, state: JobState, error: str | None = None, **details: object) -> bool:
        if state not in FINISHED_STATES:
            raise ValueError(f"finish() needs a final state ({', '.join(FINISHED_STATES)}), got {state}")
        return self._transition(
            job_id,
            (JobState.RUNNING,),
            state,
            worker,
            worker=worker,
            values={"finished_at": utcnow(), "error": error, "next_retry_at": None},
            error=error,
            **details,
        )

    def schedule_retry(self, job_id: int, worker: str, delay_seconds: float, error: str) -> bool:
        return self._transition(
            job_id,
            (JobState.RUNNING,),
            JobState.RETRY_WAIT,
            worker,
            worker=worker,
            values={"next_retry_at": utcnow() + timedelta(seconds=delay_seconds), "error": error},
            error=error,
            retry_in_s=round(delay_seconds, 3),
        )

    def requeue(self, job_id: int, worker: str, reason: str) -> bool:
        """Give a running job back (graceful shutdown); the attempt it used does not count."""
        return self._transition(
            job_id,
            (JobState.RUNNING,),
            JobState.QUEUED,
            worker,
            worker=worker,
            values={"next_retry_at": None, "worker": None, "attempts": AnalysisJob.attempts - 1},
            reason=reason,
        )

    # -- reads ------------------------------------------------------------------------------------
    def get(self, job_id: int) -> JobView:
        with session_scope(self.sf) as s:
            job = s.get(AnalysisJob, job_id)
            if job is None:
                raise JobNotFound(f"no analysis job with id {job_id}")
            return JobView.of(job)

    def list(self, state: JobState | None = None, series_uid: str | None = None, limit: int = 200) -> list[JobView]:
        with session_scope(self.sf) as s:
            q = select(AnalysisJob).order_by(AnalysisJob.id.desc()).limit(limit)
            if state is not None:
                q = q.where(AnalysisJob.state == state)
            if series_uid is not None:
                q = q.where(AnalysisJob.followup_series_uid == series_uid)
            return [JobView.of(j) for j in s.scalars(q)]

    def latest_for_series(self, series_uid: str) -> JobView | None:
        jobs = self.list(series_uid=series_uid, limit=1)
        return jobs[0] if jobs else None
