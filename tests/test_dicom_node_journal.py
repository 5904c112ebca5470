"""Index journals (issue 18): receiver processes append what they stored and how each association ended; the
service process commits both in journal order and deletes a segment once it is committed and finished."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from lesiontrack.dicom_node.inbound import journal as journal_mod
from lesiontrack.dicom_node.inbound.journal import AssociationEnded, JournalTailer, JournalWriter, decode, encode
from lesiontrack.dicom_node.inbound.sink import IndexItem


def _item(k: int, assoc: str = "a1") -> IndexItem:
    return IndexItem(
        path=Path(f"/store/st/se/1.2.{k}.dcm"),
        header={
            "SOPInstanceUID": f"1.2.{k}",
            "SeriesInstanceUID": "1.3",
            "StudyInstanceUID": "1.4",
            "PatientID": "Ünïcode ^name",
        },
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        size=1000 + k,
        received_at=datetime(2026, 12, 2, 7, 0, k, tzinfo=UTC),
        association_uid=assoc,
        calling_ae="PYSCU",
        peer="127.0.0.1",
    )


class _Indexer:
    """Stands in for the database side: records what was committed, in order."""

    def __init__(self, log: list[Any], fail: bool = False) -> None:
        self.log, self.fail = log, fail

    def index(self, items: list[IndexItem]) -> None:
        if self.fail:
            raise RuntimeError("database down")
        self.log.extend(("row", it.sop_uid, it.receiver_pid) for it in items)

    def forget_association(self, uid: str) -> None:
        self.log.append(("forget", uid))


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    log: list[Any] = []

    def fake_end(_sf: object, uids: list[str], released: bool, _actor: str = "") -> list[str]:
        log.append(("end", uids[0], released))
        return []

    monkeypatch.setattr(journal_mod, "end_transfers", fake_end)
    return log


def _tailer(tmp_path: Path, log: list[Any], fail: bool = False) -> JournalTailer:
    return JournalTailer(_Indexer(log, fail), tmp_path, session_factory=None)  # stand-ins for the database side


def test_a_record_reads_back_as_written() -> None:
    item = _item(3)
    back = decode(encode(item), pid=42)
    assert isinstance(back, IndexItem)
    assert (back.path, back.header, back.size, back.received_at, back.association_uid, back.receiver_pid) == (
        item.path, item.header, item.size, item.received_at, "a1", 42,
    )  # fmt: skip
    assert decode(encode(AssociationEnded("a1", False))) == AssociationEnded("a1", False)
    assert encode(item).count(b"\n") == 1


def test_instances_are_committed_before_their_association_ends(tmp_path: Path, calls: list[Any]) -> None:
    w = JournalWriter(tmp_path)
    for k in range(3):
        w.submit(_item(k))
    w.association_ended("a1", released=True)
    w.submit(_item(9, assoc="a2"))
    tailer = _tailer(tmp_path, calls)
    assert tailer.drain() == 4
    pid = w.pid
    assert calls == [
        ("row", "1.2.0", pid), ("row", "1.2.1", pid), ("row", "1.2.2", pid),
        ("end", "a1", True), ("forget", "a1"),
        ("row", "1.2.9", pid),
    ]  # fmt: skip
    calls.clear()
    assert tailer.drain() == 0
    assert calls == []


def test_segments_rotate_and_are_deleted_once_committed(tmp_path: Path, calls: list[Any]) -> None:
    w = JournalWriter(tmp_path, segment_bytes=1)  # every line its own segment
    for k in range(4):
        w.submit(_item(k))
    assert len(list(tmp_path.glob("index-*.journal"))) == 5  # 4 full segments + the open, empty one
    tailer = _tailer(tmp_path, calls)
    assert tailer.drain() == 4
    # the segments the writer moved on from are gone; the one it writes now stays
    assert len(list(tmp_path.glob("index-*.journal"))) == 1
    w.submit(_item(5))
    w.close()
    assert tailer.drain(dead_pids={w.pid}) == 1
    assert list(tmp_path.glob("index-*.journal")) == []
    assert [c[1] for c in calls] == ["1.2.0", "1.2.1", "1.2.2", "1.2.3", "1.2.5"]


def test_a_line_still_being_written_waits_for_its_end(tmp_path: Path, calls: list[Any]) -> None:
    w = JournalWriter(tmp_path)
    w.submit(_item(0))
    seg = next(tmp_path.glob("index-*.journal"))
    line = encode(_item(1))
    with open(seg, "ab") as f:
        f.write(line[:20])
    tailer = _tailer(tmp_path, calls)
    assert tailer.drain() == 1
    with open(seg, "ab") as f:
        f.write(line[20:])
    assert tailer.drain() == 1
    assert [c[1] for c in calls] == ["1.2.0", "1.2.1"]


def test_a_failed_commit_reads_the_same_lines_again(tmp_path: Path, calls: list[Any]) -> None:
    w = JournalWriter(tmp_path)
    w.submit(_item(0))
    w.submit(_item(1))
    with pytest.raises(RuntimeError):
        _tailer(tmp_path, calls, fail=True).drain()
    tailer = _tailer(tmp_path, calls)
    assert tailer.drain() == 2
    assert [c[1] for c in calls] == ["1.2.0", "1.2.1"]


def test_a_new_receiver_with_a_dead_ones_pid_keeps_its_journal(tmp_path: Path, calls: list[Any]) -> None:
    old = JournalWriter(tmp_path)
    old.submit(_item(0))
    old.close()
    tailer = _tailer(tmp_path, calls)
    tailer.drain(dead_pids={old.pid})  # the old writer's segments are finished and deleted
    new = JournalWriter(tmp_path)  # same pid (this process), another token
    new.submit(_item(1))
    assert tailer.drain() == 1
    assert len(list(tmp_path.glob("index-*.journal"))) == 1  # the live writer's segment is kept
    assert [c[1] for c in calls] == ["1.2.0", "1.2.1"]


def test_a_receiver_process_ingestor_journals_and_builds_no_indexer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from io import BytesIO

    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    from lesiontrack.db.session import make_engine, make_session_factory
    from lesiontrack.dicom_node.inbound import indexer as indexer_mod
    from lesiontrack.dicom_node.inbound.completion import TransferTracker
    from lesiontrack.dicom_node.inbound.ingest import Ingestor, RequestMeta
    from lesiontrack.dicom_node.inbound.storage import InstanceStore

    def no_indexer(*_a: object, **_k: object) -> None:
        raise AssertionError("a receiver process must not build an Indexer")

    monkeypatch.setattr(indexer_mod.Indexer, "__init__", no_indexer)
    ds = Dataset()
    # a header-only object of a class whose IOD the door does not check further (a CT needs its pixel data)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = generate_uid(), generate_uid(), "P1"
    buf = BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True)  # the dataset alone, as a C-STORE carries it
    engine = make_engine(f"sqlite:///{tmp_path / 'lt.sqlite3'}")
    journal = JournalWriter(tmp_path / "run")
    ingestor = Ingestor(InstanceStore(tmp_path / "store", fsync=False), make_session_factory(engine), sink=journal)
    meta = RequestMeta(SecondaryCaptureImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    try:
        assert ingestor.receive(meta, buf.getvalue(), association="a1").ok
        TransferTracker(journal).association_closed("a1", released=True)
        with pytest.raises(RuntimeError, match="cannot wait"):
            ingestor.ingest(meta, buf.getvalue())
    finally:
        ingestor.close()
        engine.dispose()
    lines = next((tmp_path / "run").glob("index-*.journal")).read_bytes().splitlines()
    records = [decode(line) for line in lines]
    assert len(records) == 2  # the instance, then its association's end; nothing from the refused ingest()
    assert isinstance(records[0], IndexItem)
    assert records[0].sop_uid == ds.SOPInstanceUID
    assert records[1] == AssociationEnded("a1", True)
