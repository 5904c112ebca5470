"""Scale-out: PostgreSQL + Redis + two `lesiontrack worker` processes (Celery); every job runs exactly once.

Real services on loopback. The workers run the small cross-process pipeline of ``tests/job_pipelines.py``
(job machinery under test); the real analysis pipeline in scale-out mode is covered by tests/test_e2e*.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from config.settings import load_settings
from db.models import AuditEvent, JobState
from db.session import make_engine, make_session_factory, session_scope
from tests.conftest import REPO, require_tool
from tests.services import PostgresServer, RedisServer

pytestmark = [pytest.mark.services, pytest.mark.slow]

LESIONTRACK = [sys.executable, "-c", "from lesiontrack.cli import main; main()"]


def wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture()
def stack(tmp_path: Path):  # type: ignore[no-untyped-def]
    require_tool("redis-server", "initdb")
    pg = PostgresServer(tmp_path)
    pg.start()
    redis = RedisServer(tmp_path).start()
    env = {**os.environ, "PYTHONPATH": str(REPO), "LESIONTRACK_DATABASE_URL": pg.url,
           "LESIONTRACK_DATA_DIR": str(tmp_path / "data"), "LESIONTRACK_WORKER__EXECUTOR": "celery",
           "LESIONTRACK_WORKER__BROKER_URL": redis.url, "LESIONTRACK_WORKER__LEASE_SECONDS": "2",
           "LESIONTRACK_WORKER__RETRY_BACKOFF_SECONDS": "[0.5]"}
    res = subprocess.run([*LESIONTRACK, "db", "upgrade"], env=env, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    procs: list[subprocess.Popen[str]] = []

    def worker() -> subprocess.Popen[str]:
        log = open(tmp_path / f"worker-{len(procs)}.log", "w")
        p = subprocess.Popen([*LESIONTRACK, "worker", "--pipeline", "tests.job_pipelines:counting",
                              "--sweep-seconds", "0.5", "--loglevel", "WARNING"],
                             env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        procs.append(p)
        return p

    old = {k: os.environ.get(k) for k in env if k.startswith("LESIONTRACK_")}
    os.environ.update({k: v for k, v in env.items() if k.startswith("LESIONTRACK_")})
    try:
        settings = load_settings()
        yield settings, make_session_factory(make_engine(pg.url)), worker, tmp_path
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        redis.stop()
        pg.stop()


def _runs(sf) -> Counter[tuple[str, str]]:  # type: ignore[no-untyped-def]
    with session_scope(sf) as s:
        evs = s.scalars(select(AuditEvent).where(AuditEvent.action == "test.step_ran")).all()
        return Counter((e.object_id, e.details["step"]) for e in evs)


def test_two_workers_run_each_job_exactly_once(stack) -> None:  # type: ignore[no-untyped-def]
    from pipeline.executors.celery_app import CeleryExecutor
    from pipeline.jobs import JobStore

    settings, sf, worker, tmp = stack
    store = JobStore(sf)
    jobs = [store.create(f"1.2.826.0.1.{i}") for i in range(10)]
    ex = CeleryExecutor(settings)
    for j in jobs:
        ex.submit(j)
    for j in jobs[:4]:  # duplicate messages (a re-trigger, a redelivery) must not run a job twice
        ex.submit(j)
    w1, w2 = worker(), worker()
    wait_for(lambda: all(store.get(j).finished for j in jobs), 120, "all jobs finished")
    assert [store.get(j).state for j in jobs] == [JobState.DONE] * len(jobs), [store.get(j).error for j in jobs]
    runs = _runs(sf)
    assert runs == Counter({(str(j), step): 1 for j in jobs for step in ("compute", "write")})
    workers = {store.get(j).worker.split(":")[1] for j in jobs}
    assert workers == {str(w1.pid), str(w2.pid)}, "both workers took jobs"
    # results equal an embedded (in-process) run of the same pipeline on the same series
    from pipeline.analysis import AnalysisService
    from tests.job_pipelines import counting

    scale = {p.name: json.loads(p.read_text()) for p in (Path(settings.data_dir) / "results").glob("*.json")}
    embedded_settings = settings.model_copy(update={"data_dir": tmp / "embedded"})
    steps, services = counting(embedded_settings, sf)
    svc = AnalysisService(sf, steps, services)
    Path(embedded_settings.data_dir).mkdir()
    for j in jobs:
        svc.run(store.retry(j))
    embedded = {p.name: json.loads(p.read_text()) for p in (tmp / "embedded" / "results").glob("*.json")}
    assert embedded == scale and len(scale) == len(jobs)


def test_killed_worker_job_is_taken_over_and_completes(stack) -> None:  # type: ignore[no-untyped-def]
    from pipeline.executors.celery_app import CeleryExecutor
    from pipeline.jobs import JobStore

    settings, sf, worker, tmp = stack
    data = Path(settings.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    (data / "block").write_text("hold")
    store = JobStore(sf)
    job = store.create("1.2.826.0.2.1")
    w1 = worker()
    CeleryExecutor(settings).submit(job)
    wait_for(lambda: (data / f"started-{job}").exists(), 60, "the job to start on worker 1")
    assert (data / f"started-{job}").read_text() == str(w1.pid)
    w1.send_signal(signal.SIGKILL)  # kill -9 mid-job: no acknowledgement, no state change recorded
    w1.wait(10)
    assert store.get(job).state is JobState.RUNNING
    (data / "block").unlink()
    w2 = worker()
    wait_for(lambda: store.get(job).finished, 120, "the job to finish on worker 2")
    assert store.get(job).state is JobState.DONE, store.get(job).error
    view = store.get(job)
    assert view.worker.split(":")[1] == str(w2.pid) and view.attempts == 2
    assert _runs(sf)[(str(job), "write")] == 1
