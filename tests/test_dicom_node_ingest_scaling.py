"""Ingest that scales (issue 18): Success once the file is durable, rows from the background indexer, several
receiver processes on one port. A series split over two receiver processes completes once; kill -9 after
Success but before indexing loses nothing; a duplicate arriving before the first copy is indexed; the
association limit holds across processes; a receiver killed mid-series is replaced and nothing is lost."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID
from sqlalchemy import select

from lesiontrack.db.models import Instance, OpenTransfer, SeriesState, TransferOutcome
from lesiontrack.db.session import session_scope
from lesiontrack.dicom_node.inbound.indexer import Indexer
from lesiontrack.dicom_node.inbound.ingest import RequestMeta, encode_meta, encode_request_meta
from tests.support.dicom_node import Node, echoscu, ge_files, running_node, wait_until
from tests.support.tools import REPO

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def _assoc(port: int) -> Any:
    from pynetdicom import AE

    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CT, EXPLICIT)
    assoc = ae.associate("127.0.0.1", port, ae_title="LESIONTRACK")
    assert assoc.is_established
    return assoc


def _store(assoc: Any, path: Path) -> int:
    return int(assoc.send_c_store(dcmread(path)).Status)


def _open_rows(node: Node) -> list[OpenTransfer]:
    with session_scope(node.sf) as s:
        return list(s.scalars(select(OpenTransfer).order_by(OpenTransfer.opened_at)))


def _uid(files: list[Path]) -> str:
    return str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def test_request_meta_is_encoded_like_pydicom() -> None:
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    for sop in ("1.2.3.4", "1.2.3.45"):  # odd and even lengths (UI padding)
        fm = FileMetaDataset()
        fm.MediaStorageSOPClassUID = UID(CT)
        fm.MediaStorageSOPInstanceUID = UID(sop)
        fm.TransferSyntaxUID = UID(EXPLICIT)
        fm.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
        fm.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
        assert encode_request_meta(RequestMeta(CT, sop, EXPLICIT)) == encode_meta(fm)


def test_no_series_completes_while_acknowledged_instances_wait_in_a_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows of a series' later instances are still in a receiver's journal when the series looks quiet in the
    database: completion first commits what was acknowledged, so the series completes once, whole."""
    from lesiontrack.dicom_node.inbound.journal import JournalTailer

    monkeypatch.setattr(JournalTailer, "_run", lambda self: None)  # only explicit drains read the journals
    files = ge_files()
    uid = _uid(files)
    node = Node(tmp_path, receiver_processes=2, series_quiet_seconds=1.0)
    node.settings.routing.min_slices = 10
    with node.scp:
        first = _assoc(node.port)
        assert _store(first, files[0]) == 0
        first.release()
        node.settle()
        s = node.series(uid)
        assert s is not None
        assert s.instance_count == 1
        assert s.state == SeriesState.RECEIVING
        rest = _assoc(node.port)
        assert all(_store(rest, f) == 0 for f in files[1:])
        rest.release()
        # the first instance's row is more than a quiet period old; the others are only in the journal
        wait_until(lambda: node.triggers == [uid], what="completion")
        s = node.series(uid)
        assert s is not None
        assert s.state == SeriesState.COMPLETE
        assert s.instance_count == len(files)
        assert len(node.audits("series.complete")) == 1
        assert node.audits("series.reopened") == []
    node.engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def two_processes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    """A node with two receiver processes, on SQLite and on a real PostgreSQL server."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    with running_node(
        tmp_path, url=url, min_slices=10, receiver_processes=2, series_quiet_seconds=1.5, max_associations=4
    ) as n:
        yield n


def test_series_split_over_two_receiver_processes_completes_once(two_processes: Node) -> None:
    node = two_processes
    files = ge_files()
    uid = _uid(files)
    assert len(node.scp.receiver_pids()) == 2
    # open associations (one instance each) until two of them are served by different receiver processes
    held: list[tuple[Any, int]] = []
    k = 0
    while len({pid for _a, pid in held}) < 2:
        assert k < 12, "the kernel never handed a connection to the second receiver process"
        assoc = _assoc(node.port)
        assert _store(assoc, files[k]) == 0
        k += 1
        expected = len(held) + 1
        wait_until(lambda e=expected: len(_open_rows(node)) == e, what="open-transfer row")  # type: ignore[misc]
        held.append((assoc, _open_rows(node)[-1].pid))
        if len(held) > 1 and held[-1][1] == held[0][1]:
            held.pop()[0].release()  # same process as the first: not needed
            wait_until(lambda: len(_open_rows(node)) == 1, what="release")
    (a, pid_a), (b, pid_b) = held
    assert pid_a != pid_b
    assert {pid_a, pid_b} <= set(node.scp.receiver_pids())
    rest = files[k:]
    half = len(rest) // 2
    for f in rest[:half]:
        assert _store(a, f) == 0
    for f in rest[half:]:
        assert _store(b, f) == 0
    a.release()
    # the association served by the other process is still open: quiet for longer than the quiet period, the
    # series keeps receiving
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0:
        s = node.series(uid)
        assert s is not None
        assert s.state == SeriesState.RECEIVING
        time.sleep(0.2)
    b.release()
    wait_until(lambda: node.triggers == [uid], what="completion")
    s = node.series(uid)
    assert s is not None
    assert s.state == SeriesState.COMPLETE
    assert s.instance_count == len(files)
    assert s.last_transfer == TransferOutcome.RELEASED
    assert len(node.audits("series.complete")) == 1
    assert node.count() == len(files) == len([p for p in node.files() if p.suffix == ".dcm"])
    assert _open_rows(node) == []


def test_max_associations_holds_across_receiver_processes(tmp_path: Path) -> None:
    n = Node(tmp_path, receiver_processes=2, max_associations=2)
    with n.scp:
        held = [_assoc(n.port), _assoc(n.port)]
        try:
            for _ in range(4):  # whichever process accepts it, the shared count says full
                assert echoscu(n.port) != 0
        finally:
            held.pop().release()
        wait_until(lambda: n.scp.active_associations == 1, what="slot freed")
        assert echoscu(n.port) == 0
        held.pop().release()
    n.engine.dispose()


def test_a_receiver_that_stops_leaves_the_shared_port_to_the_others(tmp_path: Path) -> None:
    """One receiver process ends cleanly (SIGTERM): the others keep accepting on the socket they share, and the
    pool starts a replacement that does too."""
    n = Node(tmp_path, receiver_processes=2)
    with n.scp:
        victim = n.scp.receiver_pids()[0]
        os.kill(victim, signal.SIGTERM)
        wait_until(lambda: victim not in n.scp.receiver_pids() and len(n.scp.receiver_pids()) == 2,
                   what="replacement receiver")  # fmt: skip
        assert [echoscu(n.port) for _ in range(8)] == [0] * 8
    n.engine.dispose()


def test_max_connections_per_peer_holds_across_receiver_processes(tmp_path: Path) -> None:
    n = Node(tmp_path, receiver_processes=2, max_associations=10, max_connections_per_peer=2)
    with n.scp:
        held = [_assoc(n.port), _assoc(n.port)]
        try:
            assert n.scp.pool is not None
            assert n.scp.pool.slots.peer_total("127.0.0.1") == 2
            for _ in range(4):  # whichever process accepts it, the shared per-peer count says full
                assert echoscu(n.port) != 0
        finally:
            held.pop().release()
        wait_until(lambda: echoscu(n.port) == 0, what="a peer connection freed")
        held.pop().release()
    n.engine.dispose()


def test_receiver_killed_mid_series_is_replaced_and_nothing_is_lost(two_processes: Node) -> None:
    node = two_processes
    files = ge_files()
    uid = _uid(files)
    assoc = _assoc(node.port)
    acked = [f for f in files[:6] if _store(assoc, f) == 0]
    assert len(acked) == 6
    wait_until(lambda: len(_open_rows(node)) == 1, what="open-transfer row")
    victim = _open_rows(node)[0].pid
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in node.scp.receiver_pids() and len(node.scp.receiver_pids()) == 2,
               what="replacement receiver")  # fmt: skip
    wait_until(lambda: _open_rows(node) == [], what="dead receiver's transfers ended")
    assert node.count() == 6  # everything acknowledged is indexed
    s = node.series(uid)
    assert s is not None
    assert s.last_transfer == TransferOutcome.ABORTED
    # the sender retries the whole series over a new association (acknowledged ones again: idempotent)
    retry = _assoc(node.port)
    assert all(_store(retry, f) == 0 for f in files)
    retry.release()
    wait_until(lambda: node.triggers == [uid], what="completion after the re-send")
    with session_scope(node.sf) as s2:
        sops = list(s2.scalars(select(Instance.sop_instance_uid)))
    assert len(sops) == len(set(sops)) == len(files)  # 0 lost, 0 duplicated
    series = node.series(uid)
    assert series is not None
    assert series.last_transfer == TransferOutcome.RELEASED


_PAUSED_NODE = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from lesiontrack.dicom_node.inbound.indexer import Indexer
from lesiontrack.dicom_node.inbound.journal import JournalTailer
Indexer.start = lambda self: None  # the indexer never commits: every Success is "before indexing"
JournalTailer.drain = lambda self, *a, **k: 0  # nor are the receiver processes' journals read
from tests.support.dicom_node import Node
n = Node(Path({root!r}), receiver_processes={processes})
n.scp.start()
print(n.port, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("processes", [1, 2], ids=["in-process", "two-receiver-processes"])
def test_kill9_after_success_before_indexing_is_indexed_at_restart(tmp_path: Path, processes: int) -> None:
    """The service (and with it its receiver processes) killed while acknowledged instances wait for their rows
    in the indexer's queue or in a receiver's journal: indexed at start-up, their transfer counted as dropped."""
    files = ge_files()[:4]
    uid = _uid(files)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    script = _PAUSED_NODE.format(repo=str(REPO), root=str(tmp_path), processes=processes)
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        assoc = _assoc(port)
        assert [_store(assoc, f) for f in files[:3]] == [0, 0, 0]  # Success: durable, not yet indexed
    finally:
        proc.kill()  # SIGKILL: no clean-up of any kind (receiver processes follow their parent)
        proc.wait(30)
    node = Node(tmp_path, receiver_processes=processes)
    assert node.count() == 0
    if processes > 1:  # what the receiver acknowledged is in its journal (the scan would find it too)
        lines = [ln for j in (tmp_path / "data" / "run").glob("index-*.journal") for ln in j.read_bytes().splitlines()]
        assert sum(b'"path"' in ln for ln in lines) == 3
    assert len([p for p in node.files() if p.suffix == ".dcm"]) == 3
    with node.scp:
        assert node.count() == 3  # indexed at start-up, before the port opens
        rows = node.instances()
        assert all(r.transfer_incomplete for r in rows)
        s = node.series(uid)
        assert s is not None
        assert s.last_transfer == TransferOutcome.ABORTED
        # the sender retries what was not acknowledged, and (being unsure) the rest too: no duplicate rows
        retry = _assoc(node.port)
        assert [_store(retry, f) for f in files] == [0, 0, 0, 0]
        retry.release()
        node.settle()
        assert node.count() == 4
        s = node.series(uid)
        assert s is not None
        assert s.last_transfer == TransferOutcome.RELEASED
    node.engine.dispose()


def test_stored_file_without_row_or_journal_is_found_by_the_scan(tmp_path: Path) -> None:
    """A file the journal does not know (e.g. lost with the page cache while the store's file survived)."""
    f = ge_files()[0]
    ds = dcmread(f, stop_before_pixels=True)
    node = Node(tmp_path)
    dest = node.root / "data" / "dicom" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(f.read_bytes())
    with node.scp:
        rows = node.instances()
        assert [(r.sop_instance_uid, r.file_path) for r in rows] == [(ds.SOPInstanceUID, str(dest))]
    node.engine.dispose()


def test_duplicate_arriving_before_the_first_copy_is_indexed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = ge_files()[0]
    ds = dcmread(f)
    changed = dcmread(f)
    changed.InstanceNumber = 999  # same SOP Instance UID, different bytes
    node = Node(tmp_path)
    real_start = Indexer.start
    monkeypatch.setattr(Indexer, "start", lambda self: None)  # hold every row back
    with node.scp:
        assoc = _assoc(node.port)
        assert int(assoc.send_c_store(ds).Status) == 0
        assert int(assoc.send_c_store(ds).Status) == 0  # same bytes again, first copy not indexed yet
        assert int(assoc.send_c_store(changed).Status) == 0
        assert node.count() == 0
        real_start(node.scp.indexer)  # now the three queued items are committed
        assoc.release()
        rows = node.instances()
        assert len(rows) == 2
        assert rows[0].sop_instance_uid == rows[1].sop_instance_uid == ds.SOPInstanceUID
        assert rows[0].sha256 != rows[1].sha256
        assert rows[0].file_path != rows[1].file_path
        assert len([p for p in node.files() if p.suffix == ".dcm"]) == 2
        ev = node.audits("instance.duplicate_uid_different_bytes")
        assert len(ev) == 1
        assert ev[0].object_id == ds.SOPInstanceUID
        s = node.series(str(ds.SeriesInstanceUID))
        assert s is not None
        assert s.instance_count == 2
    node.engine.dispose()


def test_open_transfers_of_a_process_that_is_gone_are_reaped_by_housekeeping(tmp_path: Path) -> None:
    """The safety net when recovering after a receiver's death failed: its open transfers do not hold the series
    for ever (they end as dropped, like at start-up)."""
    from datetime import UTC, datetime

    files = ge_files()[:2]
    uid = _uid(files)
    node = Node(tmp_path)
    with node.scp:
        assoc = _assoc(node.port)
        assert _store(assoc, files[0]) == 0
        node.scp.settle()
        [mine] = _open_rows(node)
        with session_scope(node.sf) as db:  # a row left by a receiver process that no longer exists
            db.add(
                OpenTransfer(association_uid="gone-assoc", series_uid=uid, pid=2**22 + 7, opened_at=datetime.now(UTC))
            )
        node.scp._housekeeping()
        assert [r.association_uid for r in _open_rows(node)] == [mine.association_uid]  # the live one stays
        s = node.series(uid)
        assert s is not None
        assert s.last_transfer == TransferOutcome.ABORTED
        assoc.release()
    node.engine.dispose()


def test_a_receiver_whose_service_stopped_waiting_ends_quietly(tmp_path: Path) -> None:
    """The service's own start failed (a read-only database, say) while a receiver process was starting: the
    receiver finds its "ready" pipe closed and ends without a BrokenPipeError traceback."""
    import pickle
    import socket

    from lesiontrack.dicom_node.inbound.receivers import SharedSlots, _ChildJob

    n = Node(tmp_path, receiver_processes=2)
    listener = socket.create_server(("127.0.0.1", 0))
    slots = SharedSlots.create(tmp_path / "slots", 1)
    job = _ChildJob(n.settings, listener.fileno(), 0, 1, slots.path, logging.WARNING)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lesiontrack.dicom_node.inbound.receivers"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(listener.fileno(),),
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()  # the service gave up waiting for "ready"
    proc.stdin.write(pickle.dumps(job))
    proc.stdin.close()
    try:
        assert proc.wait(60) == 0
        err = proc.stderr.read().decode(errors="replace")
    finally:
        proc.stderr.close()
        listener.close()
        slots.close()
        n.engine.dispose()
    assert "Traceback" not in err, err
    assert "BrokenPipeError" not in err, err
