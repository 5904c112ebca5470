"""Fault tests of the running service (`lesiontrack serve` as a real process):

* kill -9 in the middle of a job → after a restart the job completes (resuming, not duplicating its durable
  results) and no instance acknowledged before the kill is missing;
* the destination PACS (real Orthanc) is down while results are sent → they are delivered once it is back.

The job steps are the small cross-process pipeline of tests/support/job_pipelines.py (plus the real ``send`` step), so
the faults hit the job machinery, the SCP and the sender, not the image analysis.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from lesiontrack.config.settings import PacsPeer, Settings, load_settings
from lesiontrack.db.models import AuditEvent, Delivery, DeliveryState, Instance, JobState, Series
from lesiontrack.db.session import make_engine, make_session_factory, session_scope
from lesiontrack.pipeline.jobs.contract import job_results
from tests.support.services import LESIONTRACK, OrthancServer, free_port, wait_for, wait_for_port
from tests.support.tools import REPO

pytestmark = [pytest.mark.services, pytest.mark.slow]


def write_series(out: Path, n: int = 22, seed: int = 0) -> tuple[str, list[Path]]:
    from lesiontrack.models.imaging.dicom_write import CTSeriesHeader, write_ct_series
    from lesiontrack.models.imaging.volume import Volume

    rng = np.random.default_rng(seed)
    vol = Volume(rng.integers(-1000, 400, (n, 24, 24)).astype(np.int16), spacing=(1.5, 1.5, 2.5))
    uid = generate_uid()
    files = write_ct_series(
        vol,
        out,
        CTSeriesHeader(
            patient_id="FAULT-1",
            patient_name="Fault^Test",
            study_uid=generate_uid(),
            series_uid=uid,
            frame_of_reference_uid=generate_uid(),
            study_date="20260101",
        ),
    )
    return uid, list(files)


class Service:
    """`lesiontrack serve` in a subprocess with a TOML configuration written by the test."""

    def __init__(self, root: Path, extra_toml: str = "", port: int | None = None, receiver_processes: int = 1) -> None:
        self.root = root
        self.receiver_processes = receiver_processes
        self.port = port or free_port()
        self.data = root / "data"
        self.config = root / "lesiontrack.toml"
        self.config.write_text(f"""
data_dir = "{self.data}"
[dicom]
bind_address = "127.0.0.1"
port = {self.port}
series_quiet_seconds = 1.0
fsync = true
[http]
enabled = false
[worker]
lease_seconds = 2.0
retry_backoff_seconds = [0.5]
{extra_toml}
""")
        self.settings: Settings = load_settings(self.config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        env = {**os.environ, "PYTHONPATH": str(REPO), "LESIONTRACK_CONFIG": str(self.config)}
        env["LESIONTRACK_DICOM__RECEIVER_PROCESSES"] = str(self.receiver_processes)
        with open(self.root / f"serve-{self.starts}.log", "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [*LESIONTRACK, "serve", "--upgrade-db", "--pipeline", "tests.support.job_pipelines:counting_with_send"],
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port, timeout=60)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def send(self, files: list[Path]) -> None:
        from lesiontrack.dicom_node.outbound.scu import store_files

        peer = PacsPeer(name="lt", ae_title=self.settings.dicom.ae_title, host="127.0.0.1", port=self.port)
        outcomes = store_files(self.settings, peer, files)
        assert len(outcomes) == len(files), outcomes
        assert all(o.ok for o in outcomes), outcomes

    def session_factory(self):
        return make_session_factory(make_engine(self.settings.effective_database_url))


def _job_of(sf, series_uid: str) -> Any:
    from lesiontrack.pipeline.jobs.store import JobStore

    return JobStore(sf).latest_for_series(series_uid)


def _finished(sf, series_uid: str) -> bool:
    view = _job_of(sf, series_uid)
    return view is not None and view.finished


def _runs(sf, job_id: int, step: str) -> int:
    with session_scope(sf) as s:
        evs = s.scalars(
            select(AuditEvent).where(AuditEvent.action == "test.step_ran", AuditEvent.object_id == str(job_id))
        ).all()
        return len([e for e in evs if e.details["step"] == step])


def _jobs(sf, series_uid: str) -> list[Any]:
    from lesiontrack.db.models import AnalysisJob

    with session_scope(sf) as s:
        return list(s.scalars(select(AnalysisJob).where(AnalysisJob.followup_series_uid == series_uid)).all())


@pytest.mark.parametrize("receivers", [1, 2], ids=["in-process receiver", "2 receiver processes (journals)"])
def test_kill_9_mid_job_then_restart_completes_and_loses_no_instance(tmp_path: Path, receivers: int) -> None:
    """Also (issue 32): the restart re-triggers the completion of no series whose job exists — one job per
    series, the killed one resumed and not superseded, each job's results written once."""
    svc = Service(tmp_path, receiver_processes=receivers)
    uid_a, files_a = write_series(tmp_path / "a", seed=1)
    uid_b, files_b = write_series(tmp_path / "b", seed=2)
    svc.data.mkdir(parents=True)
    (svc.data / "block").write_text("hold the job")  # the job's first step waits while this file exists
    svc.start()
    try:
        svc.send(files_a)
        sf = svc.session_factory()
        job_a = wait_for(lambda: _job_of(sf, uid_a), 60, "a job for series A").id
        wait_for(lambda: (svc.data / f"started-{job_a}").exists(), 60, "job A to be running")
        svc.send(files_b)  # acknowledged while job A runs; series B is still within its quiet period
        svc.kill9()
        assert _job_of(sf, uid_a).state is JobState.RUNNING
        (svc.data / "block").unlink()
        svc.start()
        # series B was sent whole and released before the kill: analysed after the restart in both modes (with
        # receiver processes its journal is read again; a transfer row written before the kill must not make
        # that replay fail and leave B's last instances to the recovery scan, which held B as incomplete)
        for uid in (uid_a, uid_b):
            wait_for(
                functools.partial(_finished, sf, uid),
                90,
                f"the job of {uid} to finish",
            )
            view = _job_of(sf, uid)
            assert view.state is JobState.DONE, view.error
        a = _job_of(sf, uid_a)
        assert a.id == job_a, "the killed job itself was resumed, not replaced"
        assert a.attempts == 2, "the killed job itself was resumed, not replaced"
        assert _runs(sf, job_a, "compute") == 2
        assert _runs(sf, job_a, "write") == 1
        jobs = {uid: _jobs(sf, uid) for uid in (uid_a, uid_b)}
        assert [j.id for j in jobs[uid_a]] == [job_a], "series A completed again after the restart"
        assert len(jobs[uid_b]) == 1, "series B: more than one job"
        assert all(j.superseded_by is None for js in jobs.values() for j in js)
        assert all(_runs(sf, j.id, "write") == 1 for j in jobs[uid_b])
        with session_scope(sf) as s:
            reasons = [
                e.details.get("reason", "")
                for e in s.scalars(
                    select(AuditEvent).where(AuditEvent.object_id == str(job_a), AuditEvent.action == "job.state")
                )
            ]
            assert any("no longer running" in r for r in reasons), reasons
            for uid, files in ((uid_a, files_a), (uid_b, files_b)):
                rows = s.scalars(
                    select(Instance)
                    .join(Series, Instance.series_pk == Series.id)
                    .where(Series.series_instance_uid == uid)
                ).all()
                assert len(rows) == len(files), f"series {uid}: {len(rows)} of {len(files)} instances recorded"
                assert all(Path(r.file_path).is_file() for r in rows)
    finally:
        svc.stop()


def test_destination_down_while_sending_is_delivered_after_it_returns(tmp_path: Path) -> None:
    lt_port = free_port()
    orthanc = OrthancServer(tmp_path / "orthanc", modalities={"lesiontrack": ("LESIONTRACK", "127.0.0.1", lt_port)})
    orthanc.start()
    svc = Service(
        tmp_path,
        extra_toml=f"""
[[pacs]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {orthanc.dicom_port}
query = false
send = true
[sending]
destinations = ["pacs"]
retry_schedule_seconds = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
""",
        port=lt_port,
    )
    uid, files = write_series(tmp_path / "s", seed=3)
    orthanc.stop()  # the PACS goes down
    svc.start()
    try:
        svc.send(files)
        sf = svc.session_factory()
        wait_for(lambda: (_job_of(sf, uid) or None) and _job_of(sf, uid).finished, 90, "the job to finish")
        job = _job_of(sf, uid)
        assert job.state is JobState.DONE, job.error
        result = Path(job_results(job.step_outputs).result_files[0])

        def failed_attempts() -> int:
            with session_scope(sf) as s:
                return int(
                    s.scalar(
                        select(func.count())
                        .select_from(AuditEvent)
                        .where(AuditEvent.action.like("delivery.%"), AuditEvent.action != "delivery.queued")
                    )
                    or 0
                )

        wait_for(lambda: failed_attempts() >= 2, 60, "at least two failed delivery attempts")
        with session_scope(sf) as s:
            d = s.scalars(select(Delivery).where(Delivery.job_pk == job.id)).one()
            assert d.state is DeliveryState.RETRY_WAIT, d.state
        orthanc.start()  # the PACS is back (same ports, same storage)
        wait_for(lambda: _delivered(sf, job.id), 90, "the delivery to succeed")
        import pydicom

        sop = str(pydicom.dcmread(result, stop_before_pixels=True).SOPInstanceUID)
        found = orthanc.post("/tools/lookup", sop)
        assert found
        assert found[0]["Type"] == "Instance"
    finally:
        svc.stop()
        orthanc.stop()


def _delivered(sf, job_id: int) -> bool:
    with session_scope(sf) as s:
        d = s.scalars(select(Delivery).where(Delivery.job_pk == job_id)).one()
        return d.state is DeliveryState.DELIVERED
