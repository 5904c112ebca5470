"""A DICOM node for tests: the product's StorageSCP on a loopback port over its own database and folder, and the
real senders (dcmtk storescu/echoscu, pynetdicom) and shared-data series the tests push into it."""

from __future__ import annotations

import io
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from lesiontrack.config.settings import Settings, load_settings
from lesiontrack.db.models import AuditEvent, Instance, Series, SeriesState
from lesiontrack.db.session import make_engine, make_session_factory, session_scope, upgrade
from lesiontrack.dicom_node.inbound.scp import StorageSCP
from tests.support.tools import require_shared_data, require_tool

GE = ("interop", "ct_gantry_tilt_ge")


J2K = ("interop", "ct_siemens_j2k")


ENV = dict(os.environ, TCP_NODELAY="1")


class Node:
    """A running StorageSCP on a free loopback port with its own SQLite database and data folder."""

    def __init__(self, root: Path, url: str | None = None, **dicom: Any) -> None:
        self.root = root
        self.url = url or f"sqlite:///{root / 'lt.sqlite3'}"
        upgrade(self.url)
        cfg = {"port": 0, "bind_address": "127.0.0.1", "series_quiet_seconds": 2.0, "fsync": False} | dicom
        self.settings: Settings = load_settings(None, data_dir=root / "data", database_url=self.url, dicom=cfg)
        self.engine = make_engine(self.url)
        self.sf = make_session_factory(self.engine)
        self.triggers: list[str] = []
        self.scp = StorageSCP(self.settings, self.sf, self.triggers.append)

    @property
    def port(self) -> int:
        return self.scp.port

    def count(self, model: Any = Instance) -> int:
        with session_scope(self.sf) as s:
            return int(s.scalar(select(func.count()).select_from(model)) or 0)

    def instances(self) -> list[Instance]:
        with session_scope(self.sf) as s:
            return list(s.scalars(select(Instance).order_by(Instance.id)))

    def series(self, uid: str) -> Series | None:
        with session_scope(self.sf) as s:
            return s.scalar(select(Series).where(Series.series_instance_uid == uid))

    def series_state(self, uid: str) -> SeriesState | None:
        """The series' state, None while its first instances are not indexed yet (rows follow Success)."""
        s = self.series(uid)
        return None if s is None else s.state

    def audits(self, action: str) -> list[AuditEvent]:
        with session_scope(self.sf) as s:
            return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action)))

    def files(self) -> list[Path]:
        return sorted(p for p in (self.root / "data" / "dicom").rglob("*") if p.is_file())

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until every association ended and the indexer committed what they delivered."""
        deadline = time.monotonic() + timeout
        while self.scp.active_associations and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.scp.settle(timeout), "indexer did not catch up"


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the file meta: what goes over the wire for a C-STORE."""
    raw = Path(path).read_bytes()
    fp = io.BytesIO(raw)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return raw[fp.tell() :]


def ge_files() -> list[Path]:
    return sorted(require_shared_data(*GE).glob("*.dcm"))


def j2k_series(
    dest: Path,
    patient_id: str = "LT-J2K",
    study_uid: str | None = None,
    series_uid: str | None = None,
    study_date: str | None = None,
) -> list[Path]:
    """The Siemens JPEG 2000 series with the UIDs its anonymiser blanked filled in (pixel data untouched)."""
    src = sorted(p for p in require_shared_data(*J2K).iterdir() if p.is_file())
    dest.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    out = []
    for p in src:
        ds = dcmread(p)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = study_uid, series_uid, patient_id
        if study_date:
            ds.StudyDate = study_date
        target = dest / p.name
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


def storescu(
    port: int, files: list[Path], aet: str = "STORESCU", *extra: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    require_tool("storescu")
    r = subprocess.run(
        ["storescu", "-aet", aet, "-aec", "LESIONTRACK", *extra, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    if check:
        assert r.returncode == 0, r.stderr
    return r


def echoscu(port: int, aet: str = "STORESCU", *extra: str) -> int:
    require_tool("echoscu")
    return subprocess.run(
        ["echoscu", "-aet", aet, "-aec", "LESIONTRACK", *extra, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    ).returncode


def pynetdicom_store(port: int, paths: list[Path], abort_after: int | None = None) -> list[int]:
    """Send Part 10 files with pynetdicom (raw bytes from disk, as-is); returns the DIMSE statuses."""
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are, never decoded
    metas = [dcmread(p, stop_before_pixels=True).file_meta for p in paths]
    ae = AE(ae_title="PYSCU")
    for m in metas:
        ae.add_requested_context(m.MediaStorageSOPClassUID, m.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="LESIONTRACK")
    assert assoc.is_established
    statuses: list[int] = []
    for i, p in enumerate(paths):
        if abort_after is not None and i == abort_after:
            assoc.abort()
            return statuses
        rsp = assoc.send_c_store(p)
        statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    assoc.release()
    return statuses


def wait_until(cond: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``cond`` until it holds; fail the test after ``timeout`` seconds (a bound on failure, not a sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def running_node(root: Path, *, url: str | None = None, min_slices: int | None = None, **dicom: Any) -> Iterator[Node]:
    """A started node (``dicom`` settings as for :class:`Node`; ``min_slices`` the routing rule's), stopped after."""
    n = Node(root, url=url, **dicom)
    if min_slices is not None:
        n.settings.routing.min_slices = min_slices
    n.scp.start()
    try:
        yield n
    finally:
        n.scp.stop()
        n.engine.dispose()
