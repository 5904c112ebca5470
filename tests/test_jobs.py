"""The persisted job state machine and the in-process executor, driven by small step functions of the test.

Real SQLite (and PostgreSQL for the claim race); the real pipeline steps are exercised in tests/test_e2e*.py.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field
from sqlalchemy import select, update

from lesiontrack.db.models import AnalysisJob, AuditEvent, JobState
from lesiontrack.db.session import make_engine, make_session_factory, session_scope, upgrade
from lesiontrack.pipeline.jobs.analysis import (
    RUNTIME_KEY,
    AnalysisService,
    JobContext,
    RetryPolicy,
    RuntimeHints,
    Step,
    StepOutput,
)
from lesiontrack.pipeline.jobs.executors.inprocess import InProcessExecutor
from lesiontrack.pipeline.jobs.store import JobStore, NothingToTrack, PermanentError, TransientError
from tests.support.services import wait_for


def _factory(url: str):
    upgrade(url)
    return make_session_factory(make_engine(url))


@pytest.fixture
def sf(sqlite_url: str):
    return _factory(sqlite_url)


def _transitions(sf, job_id: int) -> list[tuple[str | None, str]]:
    with session_scope(sf) as s:
        evs = s.scalars(
            select(AuditEvent)
            .where(
                AuditEvent.object_type == "job", AuditEvent.object_id == str(job_id), AuditEvent.action == "job.state"
            )
            .order_by(AuditEvent.id)
        ).all()
        return [(e.details.get("from"), e.details["to"]) for e in evs]


class Counted(StepOutput):
    """What the test steps record: their call count and the steps whose outputs they saw."""

    n: int = 0
    seen: list[str] = Field(default_factory=list)


class Done(StepOutput):
    ok: bool = True


def _out(view: Any, step: str) -> Counted:
    return Counted.model_validate(view.step_outputs.get(step))


Ctx = JobContext[Any, Any]


class Recorder:
    """Counts step calls and lets a test script failures per call."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.devices: list[str] = []

    def step(
        self, name: str, fail: dict[int, BaseException] | None = None, durable: bool = False
    ) -> Step[Any, Any, Counted]:
        def fn(ctx: Ctx) -> Counted:
            with self.lock:
                self.calls[name] += 1
                n = self.calls[name]
            self.devices.append(ctx.device)
            if fail and n in fail:
                raise fail[n]
            return Counted(n=n, seen=sorted(ctx.outputs.names()))

        return Step(name, fn, Counted, durable=durable)


def test_happy_path_records_outputs_timings_and_audits_every_state_change(sf) -> None:
    rec = Recorder()
    svc = AnalysisService(sf, [rec.step("a", durable=True), rec.step("b"), rec.step("c")])
    job = svc.store.create("1.2.3")
    assert svc.run(job) is JobState.DONE
    view = svc.store.get(job)
    assert view.state is JobState.DONE
    assert view.attempts == 1
    assert view.error is None
    assert set(view.step_timings) == {"a", "b", "c"}
    assert all(v >= 0 for v in view.step_timings.values())
    assert _out(view, "c") == Counted(n=1, seen=["a", "b"])
    assert _transitions(sf, job) == [("queued", "running"), ("running", "done")]
    assert svc.run(job) is None, "a finished job is not claimable again"
    assert rec.calls == Counter(a=1, b=1, c=1)


def test_transient_failure_is_retried_with_backoff_then_succeeds(sf) -> None:
    rec = Recorder()
    steps = [rec.step("a", durable=True), rec.step("b", fail={1: ConnectionError("PACS unreachable")})]
    svc = AnalysisService(sf, steps, retry=RetryPolicy(3, [60.0]))
    job = svc.store.create("1.2.3")
    assert svc.run(job) is JobState.RETRY_WAIT
    view = svc.store.get(job)
    assert view.error == "b: ConnectionError: PACS unreachable"
    assert view.next_retry_at is not None
    assert view.next_retry_at.timestamp() > time.time() + 50
    assert svc.run(job) is None, "not claimable before its back-off ends"
    with session_scope(sf) as s:  # the back-off is over
        s.get(AnalysisJob, job).next_retry_at = None
    assert svc.run(job) is JobState.DONE
    assert svc.store.get(job).attempts == 2
    assert rec.calls == Counter(a=1, b=2), "the durable step 'a' is not repeated on retry"
    assert _transitions(sf, job) == [
        ("queued", "running"),
        ("running", "retry_wait"),
        ("retry_wait", "running"),
        ("running", "done"),
    ]


def test_gives_up_after_max_attempts(sf) -> None:
    rec = Recorder()
    svc = AnalysisService(
        sf,
        [rec.step("send", fail={i: TransientError("destination down") for i in range(1, 9)})],
        retry=RetryPolicy(3, [0.0]),
    )
    job = svc.store.create("1.2.3")
    states = [svc.run(job) for _ in range(3)]
    assert states == [JobState.RETRY_WAIT, JobState.RETRY_WAIT, JobState.FAILED]
    assert svc.store.get(job).error == "gave up after 3 attempts: send: destination down"


def test_permanent_failure_keeps_inputs_and_names_the_step(sf) -> None:
    rec = Recorder()
    svc = AnalysisService(
        sf, [rec.step("load", durable=True), rec.step("register", fail={1: ValueError("follow-up has 3 slices")})]
    )
    job = svc.store.create("1.2.3")
    assert svc.run(job) is JobState.FAILED
    view = svc.store.get(job)
    assert view.error == "register: ValueError: follow-up has 3 slices"
    assert view.step == "register"
    assert _out(view, "load") == Counted(n=1, seen=[]), "earlier outputs are kept"
    assert rec.calls["register"] == 1, "permanent failures are not retried"


def test_no_priors_is_nothing_to_track_not_an_error(sf) -> None:
    rec = Recorder()
    svc = AnalysisService(sf, [rec.step("match_priors", fail={1: NothingToTrack("no prior study")}), rec.step("never")])
    job = svc.store.create("1.2.3")
    assert svc.run(job) is JobState.NOTHING_TO_TRACK
    assert svc.store.get(job).error == "match_priors: no prior study"
    assert rec.calls["never"] == 0
    assert _transitions(sf, job)[-1] == ("running", "nothing_to_track")


def test_gpu_out_of_memory_falls_back_to_cpu(sf) -> None:
    rec = Recorder()
    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    svc = AnalysisService(sf, [rec.step("register", fail={1: oom})], retry=RetryPolicy(3, [0.0]), device="cuda")
    job = svc.store.create("1.2.3")
    assert svc.run(job) is JobState.RETRY_WAIT
    assert svc.run(job) is JobState.DONE
    assert rec.devices == ["cuda", "cpu"]
    assert RuntimeHints.model_validate(svc.store.get(job).step_outputs.get(RUNTIME_KEY)).device == "cpu"


def test_retry_creates_a_new_job_that_supersedes_the_old(sf) -> None:
    rec = Recorder()
    svc = AnalysisService(sf, [rec.step("a", fail={1: PermanentError("bad")})])
    old = svc.store.create("1.2.3")
    assert svc.run(old) is JobState.FAILED
    queued = svc.store.create("9.9")
    with pytest.raises(ValueError, match="only finished jobs can be retried"):
        svc.store.retry(queued)
    new = svc.store.retry(old)
    assert new != old
    old_view = svc.store.get(old)
    assert old_view.state is JobState.SUPERSEDED
    assert old_view.superseded_by == new
    assert old_view.error == "a: bad", "the old job's record is kept"
    assert svc.run(old) is None
    assert svc.run(new) is JobState.DONE


def test_a_second_trigger_reuses_the_queued_job(sf) -> None:
    store = JobStore(sf)
    a = store.create("1.2.3")
    assert store.create("1.2.3", reason="late instance") == a
    assert len(store.list(series_uid="1.2.3")) == 1


def test_orphaned_job_of_a_dead_process_resumes_after_last_durable_step(sf) -> None:
    rec = Recorder()
    steps = [
        rec.step("retrieve", durable=True),
        rec.step("register"),
        rec.step("write", durable=True),
        rec.step("send"),
    ]
    store = JobStore(sf)
    job = store.create("1.2.3")
    dead = "nohost-elsewhere:1:worker:dead"
    assert store.claim(job, dead, lease_seconds=3600)
    written = Counted(n=7, seen=["register", "retrieve"])
    store.step_finished(job, dead, "retrieve", Counted(n=1).model_dump(), 1.0)
    store.step_finished(job, dead, "register", Counted(n=1, seen=["retrieve"]).model_dump(), 1.0)
    store.step_finished(job, dead, "write", written.model_dump(), 1.0)
    svc = AnalysisService(sf, steps, lease_seconds=60)
    assert svc.run(job) is None, "its lease has not expired: not claimable"
    import socket

    with session_scope(sf) as s:  # the worker was a process on this host that no longer exists
        s.get(AnalysisJob, job).worker = f"{socket.gethostname()}:999999999:worker:gone"
    assert store.recover_orphans("test") == [job]
    assert _transitions(sf, job)[-1] == ("running", "queued")
    ex = InProcessExecutor(svc, poll_seconds=0.05)
    ex.start()
    try:
        wait_for(lambda: store.get(job).state is JobState.DONE, what="job done")
    finally:
        ex.stop()
    assert rec.calls == Counter(send=1), "resumed after the durable 'write' step"
    assert _out(store.get(job), "write") == written


def test_expired_lease_lets_another_worker_take_over(sf) -> None:
    rec = Recorder()
    store = JobStore(sf)
    job = store.create("1.2.3")
    assert store.claim(job, "otherhost:1:worker:a", lease_seconds=0.2)
    svc = AnalysisService(sf, [rec.step("a")])
    assert svc.run(job) is None
    assert wait_for(lambda: svc.run(job), timeout=10, what="lease expiry") is JobState.DONE
    assert store.get(job).attempts == 2
    assert "lease of worker otherhost:1:worker:a expired" in str(
        [e for e in _transition_events(sf, job) if e.get("reason")]
    )


def _transition_events(sf, job_id: int) -> list[dict[str, Any]]:
    with session_scope(sf) as s:
        return [
            e.details or {}
            for e in s.scalars(
                select(AuditEvent).where(AuditEvent.object_id == str(job_id), AuditEvent.action == "job.state")
            )
        ]


def test_graceful_stop_finishes_the_step_and_requeues(sf) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow(ctx: Ctx) -> Done:
        entered.set()
        assert release.wait(10)
        return Done()

    rec = Recorder()
    svc = AnalysisService(sf, [Step("slow", slow, Done, durable=True), rec.step("after")])
    ex = InProcessExecutor(svc, poll_seconds=0.05)
    job = svc.store.create("1.2.3")
    ex.start()
    ex.submit(job)
    assert entered.wait(10)
    stopper = threading.Thread(target=ex.stop, kwargs={"timeout": 10})
    stopper.start()
    release.set()
    stopper.join(15)
    view = svc.store.get(job)
    assert view.state is JobState.QUEUED
    assert view.attempts == 0
    assert view.worker is None
    assert Done.model_validate(view.step_outputs.get("slow")) == Done()
    assert rec.calls["after"] == 0
    svc2 = AnalysisService(sf, [Step("slow", slow, Done, durable=True), rec.step("after")])
    assert svc2.run(job) is JobState.DONE
    assert rec.calls["after"] == 1


def _race(sf, n_jobs: int = 12, n_workers: int = 3) -> None:
    runs: Counter[int] = Counter()
    lock = threading.Lock()

    def count(ctx: Ctx) -> Done:
        with lock:
            runs[ctx.job_id] += 1
        return Done()

    store = JobStore(sf)
    jobs = [store.create(f"1.2.{i}") for i in range(n_jobs)]
    executors = [
        InProcessExecutor(AnalysisService(sf, [Step("count", count, Done)]), poll_seconds=0.02)
        for _ in range(n_workers)
    ]
    for ex in executors:
        ex.start()
    try:
        wait_for(lambda: all(store.get(j).state is JobState.DONE for j in jobs), timeout=60, what="all jobs done")
    finally:
        for ex in executors:
            ex.stop()
    assert runs == Counter({j: 1 for j in jobs}), "each job ran exactly once"
    workers = {store.get(j).worker for j in jobs}
    assert len(workers) >= 1


def test_concurrent_workers_run_each_job_once_sqlite(sf) -> None:
    _race(sf)


@pytest.mark.services
def test_concurrent_workers_run_each_job_once_postgres(postgres_url: str) -> None:
    sf = _factory(postgres_url)
    with session_scope(sf) as s:  # the session-wide server may hold jobs of other tests
        s.execute(update(AnalysisJob).values(superseded_by=None))
    _race(sf, n_jobs=16, n_workers=4)


def test_cli_jobs_list_show_retry(sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from lesiontrack.cli import app

    sf = _factory(sqlite_url)
    rec = Recorder()
    svc = AnalysisService(sf, [rec.step("a", fail={1: PermanentError("broken input file x.dcm")})])
    job = svc.store.create("1.2.840.99")
    svc.run(job)
    monkeypatch.setenv("LESIONTRACK_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("LESIONTRACK_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    res = runner.invoke(app, ["jobs", "list"])
    assert res.exit_code == 0, res.output
    assert "1.2.840.99" in res.output
    assert "failed" in res.output
    res = runner.invoke(app, ["jobs", "show", str(job)])
    assert res.exit_code == 0
    assert "broken input file x.dcm" in res.output
    res = runner.invoke(app, ["jobs", "retry", str(job)])
    assert res.exit_code == 0, res.output
    new = svc.store.get(job).superseded_by
    assert new
    assert f"job {new}" in res.output
    res = runner.invoke(app, ["jobs", "retry", "424242"])
    assert res.exit_code != 0
    assert "no analysis job with id 424242" in res.output


def test_a_stored_output_that_no_longer_validates_fails_the_job_naming_the_step(sf) -> None:
    rec = Recorder()
    store = JobStore(sf)
    job = store.create("1.2.3")
    worker = "nohost-elsewhere:1:worker:old"
    assert store.claim(job, worker, lease_seconds=3600)
    store.step_finished(job, worker, "retrieve", {"files": "three"}, 1.0)  # written by an older version
    store.requeue(job, worker, reason="test")
    svc = AnalysisService(sf, [rec.step("retrieve", durable=True), rec.step("write")])
    assert svc.run(job) is JobState.FAILED
    view = store.get(job)
    assert view.error is not None
    assert view.error.startswith("resume: stored output of step retrieve no longer matches")
    assert rec.calls == Counter(), "nothing runs on an output it cannot trust"


def test_a_step_returning_another_model_fails_with_a_clear_reason(sf) -> None:
    def wrong(ctx: Ctx) -> Counted:
        return Done()  # type: ignore[return-value]  # deliberately breaks the declared contract

    svc = AnalysisService(sf, [Step("wrong", wrong, Counted)])
    job = svc.store.create("1.2.3")
    assert svc.run(job) is JobState.FAILED
    assert svc.store.get(job).error == "wrong: StepOrderError: step wrong returned Done, not its declared Counted"
