"""Storage SCP against real dcmtk tools: echo, store (plain and JPEG 2000), access control, duplicates, bad input,
disk-full and database failures. Helpers here are reused by the other dicom_node test modules."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import UID

from lesiontrack.dicom_node.inbound.scp import StorageSCP
from tests.support.dicom_node import (
    Node,
    dataset_bytes,
    echoscu,
    ge_files,
    j2k_series,
    pynetdicom_store,
    storescu,
)
from tests.support.tools import require_tool


def digest(path: Path) -> str:
    return hashlib.sha256(dataset_bytes(path)).hexdigest()


# -----------------------------------------------------------------------------------------------------------------


def test_echo_and_store_plain_and_jpeg2000_series_byte_identical(node: Node, tmp_path: Path) -> None:
    assert echoscu(node.port) == 0
    ge = ge_files()
    j2k = j2k_series(tmp_path / "j2k")
    storescu(node.port, ge)
    storescu(node.port, j2k, "STORESCU", "-xv")  # -xv: propose JPEG 2000 lossless, sent as-is

    rows = node.instances()
    assert len(rows) == len(ge) + len(j2k) == 48
    sent = {digest(p) for p in ge + j2k}
    assert {r.sha256 for r in rows} == sent
    for r in rows:
        assert Path(r.file_path).is_file()
        assert hashlib.sha256(dataset_bytes(Path(r.file_path))).hexdigest() == r.sha256
        assert r.sender_ae == "STORESCU"
    assert {r.transfer_syntax_uid for r in rows} == {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90"}
    # the stored file is a valid Part 10 file that pydicom reads back (and decodes, for the J2K one)
    j2k_row = next(r for r in rows if r.transfer_syntax_uid.endswith(".90"))
    assert dcmread(j2k_row.file_path).pixel_array.shape == (512, 512)
    assert not [p for p in node.files() if p.name.startswith(".tmp-")]


def test_disallowed_calling_ae_is_rejected(node: Node) -> None:
    r = storescu(node.port, ge_files()[:2], "INTRUDER", check=False)
    assert r.returncode != 0
    assert "Calling AE Title Not Recognized" in r.stderr
    assert node.count() == 0
    assert echoscu(node.port) == 0  # still serving


def test_peer_ip_allow_list(tmp_path: Path) -> None:
    n = Node(tmp_path, allowed_peer_ips=["192.0.2.10"])
    with n.scp:
        assert echoscu(n.port) != 0
    m = Node(tmp_path / "ok", allowed_peer_ips=["127.0.0.1"])
    with m.scp:
        assert echoscu(m.port) == 0


def test_duplicates_same_bytes_idempotent_different_bytes_kept_and_audited(node: Node, tmp_path: Path) -> None:
    f = ge_files()[0]
    storescu(node.port, [f])
    storescu(node.port, [f])  # same bytes again: success, nothing new
    assert node.count() == 1
    ds = dcmread(f)
    ds.InstanceNumber = 999  # same SOP Instance UID, different content
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed, enforce_file_format=True)
    storescu(node.port, [changed])
    rows = node.instances()
    assert len(rows) == 2
    assert rows[0].sop_instance_uid == rows[1].sop_instance_uid
    assert rows[0].file_path != rows[1].file_path
    assert all(Path(r.file_path).is_file() for r in rows)
    ev = node.audits("instance.duplicate_uid_different_bytes")
    assert len(ev) == 1
    assert ev[0].object_id == ds.SOPInstanceUID


def _bad_file(tmp_path: Path, name: str, body: bytes, like: Path) -> Path:
    """A Part 10 file whose meta is valid (so a sender will transmit it) but whose dataset is ``body``."""
    raw = like.read_bytes()
    meta_end = len(raw) - len(dataset_bytes(like))
    p = tmp_path / name
    p.write_bytes(raw[:meta_end] + body)
    return p


def test_bad_input_gets_failure_status_and_node_keeps_serving(node: Node, tmp_path: Path) -> None:
    good = ge_files()[:4]
    body = dataset_bytes(good[0])
    non_dicom = _bad_file(tmp_path, "junk.dcm", b"this is not DICOM at all, just some text" * 50, good[0])
    truncated = _bad_file(tmp_path, "trunc.dcm", body[: len(body) - 5000], good[0])
    ds = dcmread(good[1])
    del ds.SOPInstanceUID
    no_uid = tmp_path / "nouid.dcm"
    ds.save_as(no_uid, enforce_file_format=True)
    statuses = pynetdicom_store(node.port, [non_dicom, truncated, no_uid, good[2]])
    assert statuses[0] == 0xC000
    assert statuses[1] == 0xC000
    assert statuses[2] == 0xA900
    assert statuses[3] == 0x0000
    assert node.count() == 1
    assert len(node.files()) == 1  # nothing partial or invalid on disk

    # unsupported SOP class: the presentation context is refused, the node keeps serving
    ds = dcmread(good[3])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.3.4.5.6.7")
    odd = tmp_path / "odd.dcm"
    ds.save_as(odd, enforce_file_format=True)
    r = storescu(node.port, [odd], check=False)
    assert r.returncode != 0
    assert "No presentation context" in r.stderr
    assert node.count() == 1

    # association aborted mid-series: what was acknowledged is stored whole, nothing else
    series = ge_files()[4:12]
    statuses = pynetdicom_store(node.port, series, abort_after=5)
    assert statuses == [0] * 5
    node.settle()
    assert node.count() == 6
    assert not [p for p in node.files() if p.name.startswith(".tmp-")]
    for row in node.instances():
        assert hashlib.sha256(dataset_bytes(Path(row.file_path))).hexdigest() == row.sha256
    assert echoscu(node.port) == 0
    storescu(node.port, series)  # the sender retries the whole series: all there, once each
    assert node.count() == 1 + len(series)

    # not DICOM at all on the socket: answered with an A-ABORT PDU (type 07), the node keeps serving
    import socket

    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00" * 100)
        assert sock.recv(10)[:1] == b"\x07"
    assert echoscu(node.port) == 0


def test_database_busy_does_not_delay_success_and_nothing_is_lost(node: Node) -> None:
    """Durable first (issue 18): Success once the file is in the store; the row follows when the database is
    free again (here another connection holds SQLite's write lock while the instances arrive)."""
    import sqlite3
    import threading

    files = ge_files()[:2]
    locker = sqlite3.connect(str(node.root / "lt.sqlite3"), timeout=1)
    locker.execute("BEGIN EXCLUSIVE")
    statuses: list[int] = []
    sender = threading.Thread(target=lambda: statuses.extend(pynetdicom_store(node.port, files)))
    sender.start()
    try:
        # both acknowledged and on disk while the database cannot be written (the sender now waits in its
        # A-RELEASE, which the node answers once the rows are committed)
        deadline = time.monotonic() + 30
        while len([p for p in node.files() if p.suffix == ".dcm"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len([p for p in node.files() if p.suffix == ".dcm"]) == 2
    finally:
        locker.rollback()
        locker.close()
    sender.join(60)
    assert statuses == [0, 0]
    assert node.count() == 2
    assert echoscu(node.port) == 0


def _assert_disk_full_handled(data_dir: Path, root: Path) -> list[int]:
    n = Node(root)
    n.settings.data_dir = data_dir
    n.scp = StorageSCP(n.settings, n.sf, n.triggers.append)
    with n.scp:
        statuses = pynetdicom_store(n.port, ge_files()[:4])  # 0.5 MB each
        assert echoscu(n.port) == 0  # still serving
    assert 0xA700 in statuses
    assert set(statuses) <= {0, 0xA700}
    assert n.count() == statuses.count(0)
    assert not list(data_dir.rglob(".tmp-*"))
    n.engine.dispose()
    return statuses


def test_disk_full_answers_out_of_resources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real 1 MB tmpfs where mounting is allowed (CI runs as root); else the kernel's /dev/full (ENOSPC)."""
    require_tool("mount", "umount")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, check=False)
    if r.returncode == 0:
        try:
            statuses = _assert_disk_full_handled(mnt, tmp_path / "db")
            assert statuses[0] == 0  # the first one fits
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
        return
    # no mount here: every temporary file the store opens is /dev/full, whose writes fail with ENOSPC

    real_open = os.open

    def open_full(path: Any, flags: int, mode: int = 0o777) -> int:
        if Path(path).name.startswith(".tmp-"):
            Path(path).touch()  # so the store's clean-up has something to remove
            return real_open("/dev/full", os.O_WRONLY)
        return real_open(path, flags, mode)

    monkeypatch.setattr("lesiontrack.dicom_node.inbound.storage.os.open", open_full)
    assert _assert_disk_full_handled(mnt, tmp_path / "db") == [0xA700] * 4


def test_max_associations_and_orphan_cleanup(tmp_path: Path) -> None:
    from pynetdicom import AE

    n = Node(tmp_path, max_associations=1)
    leftover = n.root / "data" / "dicom" / "1.2" / "3.4" / ".tmp-deadbeef"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a file from a crash")
    with n.scp:
        assert not leftover.exists()  # interrupted writes are cleaned up at start
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        held = ae.associate("127.0.0.1", n.port, ae_title="LESIONTRACK")
        assert held.is_established
        try:
            assert echoscu(n.port) != 0  # over the limit: refused
        finally:
            held.release()
        deadline = time.monotonic() + 10
        while n.scp.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        assert echoscu(n.port) == 0
