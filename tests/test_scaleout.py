"""Scale-out: PostgreSQL + Redis + two `lesiontrack worker` processes (Celery); every job runs exactly once.

Real services on loopback. The workers run the small cross-process pipeline of ``tests/support/job_pipelines.py``
(job machinery under test); the real analysis pipeline in scale-out mode is covered by tests/test_e2e*.py.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from lesiontrack.config.settings import load_settings
from lesiontrack.db.models import AuditEvent, JobState
from lesiontrack.db.session import make_engine, make_session_factory, session_scope
from lesiontrack.pipeline.jobs.store import JobStore
from tests.support.services import LESIONTRACK, PostgresServer, RedisServer, wait_for
from tests.support.tools import REPO, require_tool

pytestmark = [pytest.mark.services, pytest.mark.slow]


@pytest.fixture
def stack(tmp_path: Path):
    require_tool("redis-server", "initdb")
    pg = PostgresServer(tmp_path)
    pg.start()
    redis = RedisServer(tmp_path).start()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "LESIONTRACK_DATABASE_URL": pg.url,
        "LESIONTRACK_DATA_DIR": str(tmp_path / "data"),
        "LESIONTRACK_WORKER__EXECUTOR": "celery",
        "LESIONTRACK_WORKER__BROKER_URL": redis.url,
        "LESIONTRACK_WORKER__LEASE_SECONDS": "2",
        "LESIONTRACK_WORKER__RETRY_BACKOFF_SECONDS": "[0.5]",
    }
    res = subprocess.run([*LESIONTRACK, "db", "upgrade"], env=env, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    procs: list[subprocess.Popen[str]] = []

    def worker(pipeline: str = "tests.support.job_pipelines:counting", **extra_env: str) -> subprocess.Popen[str]:
        with open(tmp_path / f"worker-{len(procs)}.log", "w") as log:  # the child keeps its own descriptor
            p = subprocess.Popen(
                [*LESIONTRACK, "worker", "--pipeline", pipeline, "--sweep-seconds", "0.5", "--loglevel", "WARNING"],
                env={**env, **extra_env},
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
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


def _finished(store: JobStore, series_uid: str) -> bool:
    view = store.latest_for_series(series_uid)
    return view is not None and view.finished


def _runs(sf) -> Counter[tuple[str, str]]:
    with session_scope(sf) as s:
        evs = s.scalars(select(AuditEvent).where(AuditEvent.action == "test.step_ran")).all()
        return Counter((str(e.object_id), str(e.details["step"])) for e in evs)


def test_two_workers_run_each_job_exactly_once(stack) -> None:
    from lesiontrack.pipeline.jobs.executors.celery_app import CeleryExecutor

    settings, sf, worker, tmp = stack
    store = JobStore(sf)
    jobs = [store.create(f"1.2.826.0.1.{i}") for i in range(10)]
    ex = CeleryExecutor(settings)
    for j in jobs:
        ex.submit(j)
    for j in jobs[:4]:  # duplicate messages (a re-trigger, a redelivery) must not run a job twice
        ex.submit(j)
    data = Path(settings.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    (data / "block").write_text("hold")  # each worker holds its first job until both have one (no race to win)
    w1, w2 = worker(), worker()

    def holders() -> set[str]:
        return {p.read_text() for p in data.glob("started-*")}

    wait_for(lambda: holders() == {str(w1.pid), str(w2.pid)}, 120, "each worker to take a job")
    (data / "block").unlink()
    wait_for(lambda: all(store.get(j).finished for j in jobs), 120, "all jobs finished")
    assert [store.get(j).state for j in jobs] == [JobState.DONE] * len(jobs), [store.get(j).error for j in jobs]
    runs = _runs(sf)
    assert runs == Counter({(str(j), step): 1 for j in jobs for step in ("compute", "write")})
    workers = {store.get(j).worker.split(":")[1] for j in jobs}
    assert workers == {str(w1.pid), str(w2.pid)}, "both workers took jobs"
    # results equal an embedded (in-process) run of the same pipeline on the same series
    from lesiontrack.pipeline.jobs.analysis import AnalysisService
    from tests.support.job_pipelines import counting

    scale = {p.name: json.loads(p.read_text()) for p in (Path(settings.data_dir) / "results").glob("*.json")}
    embedded_settings = settings.model_copy(update={"data_dir": tmp / "embedded"})
    steps, services = counting(embedded_settings, sf)
    svc = AnalysisService(sf, steps, services)
    Path(embedded_settings.data_dir).mkdir()
    for j in jobs:
        svc.run(store.retry(j))
    embedded = {p.name: json.loads(p.read_text()) for p in (tmp / "embedded" / "results").glob("*.json")}
    assert embedded == scale
    assert len(scale) == len(jobs)


def test_killed_worker_job_is_taken_over_and_completes(stack) -> None:
    from lesiontrack.pipeline.jobs.executors.celery_app import CeleryExecutor
    from lesiontrack.pipeline.jobs.store import JobStore

    settings, sf, worker, _tmp = stack
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
    assert view.worker.split(":")[1] == str(w2.pid)
    assert view.attempts == 2
    assert _runs(sf)[(str(job), "write")] == 1


def _observations(sf) -> dict[tuple[str, str], tuple[str, float | None, float | None]]:
    from lesiontrack.db.models import Lesion, LesionObservation

    with session_scope(sf) as s:
        rows = s.execute(
            select(LesionObservation, Lesion.tracking_uid).join(Lesion, LesionObservation.lesion_pk == Lesion.id)
        ).all()
        return {(o.series_instance_uid, uid): (o.status.value, o.volume_mm3, o.long_axis_mm) for o, uid in rows}


def test_real_pipeline_on_two_workers_equals_embedded(stack, tmp_path_factory) -> None:
    """The real analysis steps in two Celery workers (jobs published by `lesiontrack serve`) give exactly the
    lesions and measurements of an embedded run on the same DICOM input; each job runs once. Registration engine
    'none' keeps this test fast: what is compared is the job machinery around the same analysis code."""
    from lesiontrack.config.settings import PacsPeer
    from lesiontrack.demo import demo_settings
    from lesiontrack.demo_data import FollowUps, make_patient
    from lesiontrack.dicom_node.outbound.scu import store_files
    from lesiontrack.pipeline.jobs.store import JobStore
    from lesiontrack.service import LesionTrackService
    from tests.support.services import free_port, wait_for_port

    settings, sf, worker, tmp = stack
    patient = make_patient(
        tmp_path_factory.mktemp("pt"),
        seed=3,
        shape=(48, 96, 96),
        spacing=(3.0, 3.0, 3.0),
        n_lesions=3,
        n_followups=2,
        follow_ups=FollowUps.MOTION,
    )
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "LESIONTRACK_DICOM__PORT": str(port),
        "LESIONTRACK_DICOM__BIND_ADDRESS": "127.0.0.1",
        "LESIONTRACK_DICOM__SERIES_QUIET_SECONDS": "1",
        "LESIONTRACK_HTTP__ENABLED": "false",
        "LESIONTRACK_ENGINES__REGISTRATION": "none",
    }
    with open(tmp / "serve.log", "w") as serve_log:  # the child keeps its own descriptor
        serve = subprocess.Popen(
            [*LESIONTRACK, "serve"], env=env, cwd=REPO, stdout=serve_log, stderr=subprocess.STDOUT, text=True
        )
    store = JobStore(sf)
    try:
        wait_for_port(port, timeout=60)
        for _ in range(2):
            worker("lesiontrack.pipeline.jobs.steps:build_pipeline", LESIONTRACK_ENGINES__REGISTRATION="none")
        peer = PacsPeer(name="lt", ae_title="LESIONTRACK", host="127.0.0.1", port=port)
        sequence = [[*patient.baseline.files, patient.seg_file]] + [fu.files for fu in patient.followups]
        uids = [patient.baseline.series_uid] + [fu.series_uid for fu in patient.followups]
        for files, uid in zip(sequence, uids, strict=True):
            assert all(o.ok for o in store_files(settings, peer, files))
            wait_for(
                functools.partial(_finished, store, uid),
                300,
                f"the analysis of {uid}",
            )
        states = [store.latest_for_series(u).state for u in uids]
        assert states == [JobState.NOTHING_TO_TRACK, JobState.DONE, JobState.DONE], [
            store.latest_for_series(u).error for u in uids
        ]
        with session_scope(sf) as s:
            starts = Counter(
                e.object_id
                for e in s.scalars(select(AuditEvent).where(AuditEvent.action == "job.step_started"))
                if e.details.get("step") == "track"
            )
        assert set(starts.values()) == {1}, starts
        scale = _observations(sf)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
    # the same input through the embedded service
    emb_settings = demo_settings(
        tmp / "embedded",
        http=False,
        database_url=None,
        worker={"executor": "inprocess"},
        engines={"registration": "none"},
    )
    svc = LesionTrackService(emb_settings).start()
    try:
        for files, uid in zip(sequence, uids, strict=True):
            for f_ok in store_files(
                emb_settings,
                PacsPeer(name="e", ae_title="LESIONTRACK", host="127.0.0.1", port=emb_settings.dicom.port),
                files,
            ):
                assert f_ok.ok
            wait_for(
                functools.partial(_finished, svc.job_store, uid),
                300,
                f"embedded analysis of {uid}",
            )
        embedded = _observations(svc.session_factory)
    finally:
        svc.stop()
    assert scale
    assert scale == embedded
