"""The analysis service: claims a job and runs its ordered steps, recording outputs, timings and the outcome.

A step is a function ``fn(ctx: JobContext) -> StepOutput`` with a declared output model (see ``pipeline.jobs.steps`` for
the real ones). Every step's output is a pydantic :class:`StepOutput`, stored as JSON in the job row and validated
again when the job resumes: a stored output that no longer validates fails the job with a reason naming the step.
Steps read earlier outputs by their model (``ctx.outputs.get(MatchPriorsOutput)``), never by string paths, and
share in-memory state through one typed object (``ctx.state``, made by the service's ``state_factory``).

A *durable* step leaves its results on disk or in the database (its output says where, and its
:meth:`StepOutput.still_valid` says whether they are still there); after a crash or a retry the runner resumes
right after the last durable step whose outputs are still valid, and re-runs the in-memory steps in between. Every
step must therefore be idempotent: running it again gives the same outcome and never creates duplicate objects.

Outcomes: ``NothingToTrack`` → ``nothing_to_track``; ``TransientError`` (and connection errors, timeouts, GPU
out-of-memory, which also switches the job to CPU) → ``retry_wait`` with back-off from
``worker.retry_backoff_seconds`` until ``worker.max_attempts``; anything else → ``failed`` with a readable
reason naming the step. Inputs (received instances, retrieved priors, recorded outputs) are never deleted.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypedDict, TypeVar, Unpack

from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.config.logging import log_context, update_log_context
from lesiontrack.config.settings import WorkerSettings
from lesiontrack.db.models import JobState
from lesiontrack.pipeline.jobs.job_summary import job_summary
from lesiontrack.pipeline.jobs.store import (
    DEFAULT_LEASE_SECONDS,
    JobStore,
    NothingToTrack,
    PermanentError,
    TransientError,
    worker_identity,
)

log = logging.getLogger(__name__)

RUNTIME_KEY = "_runtime"  # job-level hints kept beside the step outputs (see JobStore.set_runtime)


class StopRequested(Exception):
    """Raised inside the runner when the process is shutting down; the job is requeued."""


class LeaseLost(Exception):
    """Another worker took the job over (our lease ran out); we must not record anything more."""


class Superseded(Exception):
    """A newer job of the same series superseded this one while it ran: stop before the next step (above all
    before ``send``), so results of a superseded analysis never reach the PACS."""


class StepOrderError(RuntimeError):
    """A step asked for an output or state that an earlier step should have produced (a pipeline wiring bug)."""


class StepOutput(BaseModel):
    """Base of every step's recorded output (JSON in ``analysis_job.step_outputs``)."""

    model_config = ConfigDict(extra="forbid")

    def still_valid(self) -> bool:
        """For durable steps: are the results this output points at still there? (resume skips the step if so)"""
        return True


class RuntimeHints(BaseModel):
    """Job-level hints kept across attempts, e.g. ``device='cpu'`` after a GPU out-of-memory."""

    model_config = ConfigDict(extra="allow")

    device: str | None = None
    cpu_fallback_reason: str | None = None


OutputT = TypeVar("OutputT", bound=StepOutput)
ServicesT = TypeVar("ServicesT")
StateT = TypeVar("StateT")


class StepOutputs:
    """The validated outputs of the steps run so far, read by their model type."""

    def __init__(self, by_step: Mapping[str, StepOutput] | None = None) -> None:
        self._by_step: dict[str, StepOutput] = dict(by_step or {})

    def find(self, model: type[OutputT]) -> OutputT | None:
        for value in self._by_step.values():
            if isinstance(value, model):
                return value
        return None

    def get(self, model: type[OutputT]) -> OutputT:
        found = self.find(model)
        if found is None:
            raise StepOrderError(f"no {model.__name__} recorded yet (the step producing it has not run)")
        return found

    def record(self, step: str, output: StepOutput) -> None:
        self._by_step[step] = output

    def names(self) -> list[str]:
        return list(self._by_step)

    def __contains__(self, step: object) -> bool:
        return step in self._by_step

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_step)


@dataclass
class JobContext(Generic[ServicesT, StateT]):
    """What a step sees: the job, outputs of earlier steps, the shared services and the job's in-memory state."""

    job_id: int
    series_uid: str
    attempt: int
    worker: str
    outputs: StepOutputs
    services: ServicesT
    state: StateT
    device: str = "auto"
    progress: Callable[[str], None] | None = None

    def report(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


@dataclass(frozen=True)
class Step(Generic[ServicesT, StateT, OutputT]):
    """One named step, its function and the model of what it produces."""

    name: str
    fn: Callable[[JobContext[ServicesT, StateT]], OutputT]
    output: type[OutputT]
    durable: bool = False

    def load(self, stored: object) -> OutputT:
        """Validate a stored output; a PermanentError naming the step when it no longer matches the model."""
        try:
            return self.output.model_validate(stored)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()[:3]
            )
            raise PermanentError(
                f"stored output of step {self.name} no longer matches {self.output.__name__} ({problems}); "
                "retry the job to recompute it"
            ) from exc


@dataclass
class RetryPolicy:
    max_attempts: int = 5
    backoff_seconds: Sequence[float] = (30, 120, 600)

    def delay(self, attempt: int) -> float:
        if not self.backoff_seconds:
            return 0.0
        return float(self.backoff_seconds[min(max(attempt - 1, 0), len(self.backoff_seconds) - 1)])

    @classmethod
    def from_settings(cls, worker_settings: WorkerSettings) -> RetryPolicy:
        return cls(worker_settings.max_attempts, list(worker_settings.retry_backoff_seconds))


def classify(exc: BaseException) -> tuple[str, bool]:
    """("nothing"|"transient"|"permanent", force_cpu) for an exception raised by a step."""
    if isinstance(exc, NothingToTrack):
        return "nothing", False
    if isinstance(exc, TransientError):
        return "transient", exc.force_cpu
    if isinstance(exc, PermanentError):
        return "permanent", False
    name = type(exc).__name__
    text = str(exc).lower()
    if name == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "out of memory" in text and ("cuda" in text or "gpu" in text or "hip" in text)
    ):
        return "transient", True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return "transient", False
    return "permanent", False


def _reason(step: str, exc: BaseException) -> str:
    msg = str(exc).strip() or type(exc).__name__
    if isinstance(exc, (TransientError, PermanentError, NothingToTrack)):
        return f"{step}: {msg}"
    return f"{step}: {type(exc).__name__}: {msg}"


class ServiceOptions(TypedDict, total=False):
    """How an :class:`AnalysisService` runs its jobs (keyword arguments)."""

    lease_seconds: float  # a claimed job's lease (renewed while it runs); default DEFAULT_LEASE_SECONDS
    worker: str | None  # this worker's identity (default: host and process)
    device: str  # "auto", "cpu", "cuda", ...
    progress: Callable[[int, str], None] | None  # (job id, message): what a running job reports


class AnalysisService:
    """Runs analysis jobs with a fixed list of steps; one instance per worker process (thread-safe per job)."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        steps: Sequence[Step[Any, Any, Any]],
        services: object = None,
        *,
        state_factory: Callable[[], object] = lambda: None,
        retry: RetryPolicy | None = None,
        **options: Unpack[ServiceOptions],
    ) -> None:
        names = [s.name for s in steps]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate step names: {names}")
        self.store = JobStore(session_factory)
        self.steps = list(steps)
        self.services = services
        self.state_factory = state_factory
        self.retry = retry or RetryPolicy()
        self.lease_seconds = float(options.get("lease_seconds", DEFAULT_LEASE_SECONDS))
        self.worker = options.get("worker") or worker_identity()
        self.device = options.get("device", "auto")
        self.progress = options.get("progress")
        self.stop_event = threading.Event()

    @property
    def step_names(self) -> list[str]:
        return [s.name for s in self.steps]

    def request_stop(self) -> None:
        """Finish the step in progress, then requeue the job; claim nothing new."""
        self.stop_event.set()

    # -- entry points -----------------------------------------------------------------------------
    def run(self, job_id: int) -> JobState | None:
        """Claim and run ``job_id``; None when it is not claimable (another worker has it, or not due)."""
        if self.stop_event.is_set() or not self.store.claim(job_id, self.worker, self.lease_seconds):
            return None
        return self._run_claimed(job_id)

    def run_next(self) -> tuple[int, JobState | None] | None:
        if self.stop_event.is_set():
            return None
        job_id = self.store.claim_next(self.worker, self.lease_seconds)
        if job_id is None:
            return None
        return job_id, self._run_claimed(job_id)

    # -- the runner -------------------------------------------------------------------------------
    def _load_outputs(self, stored: Mapping[str, object]) -> tuple[int, StepOutputs]:
        """Where to resume and the validated outputs kept: those of the steps before the resume point.

        Raises PermanentError (naming the step) when a kept output no longer matches its model."""
        start = 0
        for i, step in enumerate(self.steps):
            if step.name not in stored:
                break
            if step.durable:
                if not step.load(stored[step.name]).still_valid():
                    break
                start = i + 1
        kept = StepOutputs({s.name: s.load(stored[s.name]) for s in self.steps[:start]})
        return start, kept

    def _run_claimed(self, job_id: int) -> JobState | None:
        with log_context(job=job_id):  # every log line of this job carries job (+ series_uid, step below)
            return self._run_job(job_id)

    def _run_job(self, job_id: int) -> JobState | None:
        view = self.store.get(job_id)
        update_log_context(series_uid=view.followup_series_uid)
        runtime = RuntimeHints.model_validate(view.step_outputs.get(RUNTIME_KEY, {}))
        progress = self.progress
        ctx: JobContext[object, object] = JobContext(
            job_id=job_id,
            series_uid=view.followup_series_uid,
            attempt=view.attempts,
            worker=self.worker,
            outputs=StepOutputs(),
            services=self.services,
            state=self.state_factory(),
            device=runtime.device or self.device,
            progress=(lambda m: progress(job_id, m)) if progress is not None else None,
        )
        try:
            start, ctx.outputs = self._load_outputs(view.step_outputs)
        except PermanentError as exc:
            return self._fail(job_id, ctx, "resume", exc)
        stale = [s.name for s in self.steps[start:] if s.name in view.step_outputs]
        if stale:
            self.store.forget_outputs(job_id, stale)
        if start:
            log.info("job %s resumes after step %s (attempt %s)", job_id, self.steps[start - 1].name, view.attempts)
        lost = threading.Event()
        done = threading.Event()
        beat = threading.Thread(
            target=contextvars.copy_context().run,  # the heartbeat logs with the job's context too
            args=(self._heartbeat, job_id, lost, done),
            daemon=True,
            name=f"lease-{job_id}",
        )
        beat.start()
        step_name = self.steps[start].name if start < len(self.steps) else "done"
        try:
            for step in self.steps[start:]:
                step_name = step.name
                update_log_context(step=step.name)
                if lost.is_set():
                    raise LeaseLost(job_id)
                if self.stop_event.is_set():
                    raise StopRequested()
                if self.store.superseded_by(job_id) is not None:
                    raise Superseded()
                self.store.step_started(job_id, self.worker, step.name)
                ctx.report(step.name)
                t0 = time.perf_counter()
                result = step.fn(ctx)
                if not isinstance(result, step.output):
                    raise StepOrderError(
                        f"step {step.name} returned {type(result).__name__}, not its declared {step.output.__name__}"
                    )
                seconds = time.perf_counter() - t0
                if lost.is_set():
                    raise LeaseLost(job_id)
                ctx.outputs.record(step.name, result)
                self.store.step_finished(job_id, self.worker, step.name, result.model_dump(mode="json"), seconds)
                log.debug("job %s step %s done in %.2fs", job_id, step.name, seconds)
        except StopRequested:
            self.store.requeue(job_id, self.worker, reason=f"worker shutting down before step {step_name}")
            return JobState.QUEUED
        except LeaseLost:
            log.warning("job %s: lease lost during %s; another worker owns it now", job_id, step_name)
            return None
        except Superseded:
            log.warning("job %s superseded by a newer job of its series: stopped before %s", job_id, step_name)
            self.store.stop_superseded(job_id, self.worker, step_name)
            ctx.report("superseded")
            return JobState.SUPERSEDED
        except Exception as exc:
            return self._fail(job_id, ctx, step_name, exc)
        finally:
            done.set()
            beat.join(timeout=5)
        self.store.finish(job_id, self.worker, JobState.DONE)
        self._log_summary(job_id, ctx, JobState.DONE)
        ctx.report("done")
        return JobState.DONE

    def _log_summary(
        self, job_id: int, ctx: JobContext[object, object], state: JobState, reason: str | None = None
    ) -> None:
        """The job's one INFO line (steps, priors, lesions, timings, delivery) from the recorded step outputs (JSON);
        the details are at DEBUG."""
        try:
            view = self.store.get(job_id)
            line = job_summary(job_id, ctx.series_uid, state.value, view.step_outputs, view.step_timings or {}, reason)
        except Exception as exc:  # a summary must never fail a job
            line = f"job {job_id} {state.value}: series {ctx.series_uid} (summary unavailable: {exc})"
        log.info("%s", line)

    def _fail(self, job_id: int, ctx: JobContext[object, object], step: str, exc: BaseException) -> JobState:
        kind, force_cpu = classify(exc)
        reason = _reason(step, exc)
        if kind == "nothing":
            self.store.finish(job_id, self.worker, JobState.NOTHING_TO_TRACK, error=reason, step=step)
            self._log_summary(job_id, ctx, JobState.NOTHING_TO_TRACK, reason)
            ctx.report("nothing to track")
            return JobState.NOTHING_TO_TRACK
        if kind == "transient":
            if force_cpu and ctx.device != "cpu":
                self.store.set_runtime(job_id, device="cpu", cpu_fallback_reason=reason)
                log.warning("job %s: GPU out of memory in %s, next attempt on CPU", job_id, step)
            if ctx.attempt < self.retry.max_attempts:
                delay = self.retry.delay(ctx.attempt)
                log.warning(
                    "job %s: transient failure (%s), retry %s/%s in %.0fs",
                    job_id,
                    reason,
                    ctx.attempt + 1,
                    self.retry.max_attempts,
                    delay,
                )
                self.store.schedule_retry(job_id, self.worker, delay, reason)
                ctx.report("retry wait")
                return JobState.RETRY_WAIT
            reason = f"gave up after {ctx.attempt} attempts: {reason}"
        else:
            log.error("job %s failed permanently: %s", job_id, reason, exc_info=exc)
        self.store.finish(job_id, self.worker, JobState.FAILED, error=reason, step=step)
        self._log_summary(job_id, ctx, JobState.FAILED, reason)
        ctx.report("failed")
        return JobState.FAILED

    def _heartbeat(self, job_id: int, lost: threading.Event, done: threading.Event) -> None:
        interval = max(self.lease_seconds / 3.0, 0.05)
        while not done.wait(interval):
            try:
                if not self.store.heartbeat(job_id, self.worker, self.lease_seconds):
                    lost.set()
                    return
            except Exception:
                log.exception("job %s: heartbeat failed", job_id)
