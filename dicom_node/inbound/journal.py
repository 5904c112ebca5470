"""Index journals: how receiver processes hand what they stored to the service process (issue 18).

A receiver process (:mod:`dicom_node.inbound.receivers`) does no database work on its network threads: after the durable
write it appends one line to its journal (:class:`JournalWriter`) — the path and the header values the door
validation read — and answers Success. How each association ended is a line in the same journal, so it follows
the instances it delivered. The service process reads every journal (:class:`JournalTailer`), commits the rows in
batches through its :class:`dicom_node.inbound.indexer.Indexer` (one writer to the database, whatever the number of
receivers) and records each association's end once its instances are committed.

A journal is a series of segments ``index-<pid>-<token>-<n>.journal``; the writer starts the next segment when one
passes :data:`SEGMENT_BYTES`, the tailer deletes a segment once everything in it is committed and the writer has
moved on (or died). Lines are JSON; replaying one twice is harmless (the indexer is idempotent), so after a crash
of the service every journal left on disk is simply read again from the start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.dicom_node.inbound.completion import end_transfers
from lesiontrack.dicom_node.inbound.indexer import BATCH, BATCH_WINDOW_S, Indexer
from lesiontrack.dicom_node.inbound.sink import IndexItem

log = logging.getLogger(__name__)

#: a writer starts a new segment once the current one is this large (a few thousand instances)
SEGMENT_BYTES = 4 << 20

_SEGMENT = re.compile(r"^index-(\d+)-(\d+)-(\d+)\.journal$")


@dataclass(frozen=True)
class AssociationEnded:
    """An association of a receiver process ended: released (A-RELEASE) or not (abort, dropped connection)."""

    association_uid: str
    released: bool


JournalRecord = IndexItem | AssociationEnded


def encode(record: JournalRecord) -> bytes:
    """One journal line (JSON, newline-terminated)."""
    if isinstance(record, AssociationEnded):
        doc: dict[str, object] = {"end": record.association_uid, "released": record.released}
    else:
        doc = {
            "path": str(record.path),
            "header": record.header,
            "class": record.sop_class_uid,
            "ts": record.transfer_syntax_uid,
            "size": record.size,
            "at": record.received_at.isoformat(),
            "assoc": record.association_uid,
            "ae": record.calling_ae,
            "peer": record.peer,
        }
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes, pid: int | None = None) -> JournalRecord:
    """A journal line back as a record; ``pid`` (the writer's) goes into an :class:`IndexItem`."""
    doc = json.loads(line)
    if "end" in doc:
        return AssociationEnded(str(doc["end"]), bool(doc["released"]))
    return IndexItem(
        path=Path(doc["path"]),
        header={str(k): str(v) for k, v in doc["header"].items()},
        sop_class_uid=str(doc["class"]),
        transfer_syntax_uid=str(doc["ts"]),
        size=int(doc["size"]),
        received_at=datetime.fromisoformat(doc["at"]),
        association_uid=doc.get("assoc"),
        calling_ae=doc.get("ae"),
        peer=doc.get("peer"),
        receiver_pid=pid,
    )


class JournalWriter:
    """A receiver process's :class:`dicom_node.inbound.sink.IndexSink`: ``submit`` (a stored instance) and
    ``association_ended``, each one ``write`` of one line to a file opened with ``O_APPEND``. Thread-safe. The
    kernel has the line when the call returns; with ``dicom.fsync`` the journal is not fsync'ed (the stored file
    is, and the recovery scan indexes a file whose line was lost). It cannot wait for rows (no ``flush``)."""

    def __init__(self, journal_dir: Path, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.journal_dir = Path(journal_dir)
        self.segment_bytes = segment_bytes
        self.pid = os.getpid()
        self._token = time.time_ns()  # tells this writer's segments from those of an earlier process with our pid
        self._n = 0
        self._fd: int | None = None
        self._size = 0
        self._lock = threading.Lock()

    def _path(self, n: int) -> Path:
        return self.journal_dir / f"index-{self.pid}-{self._token}-{n:06d}.journal"

    def _append(self, line: bytes) -> None:
        with self._lock:
            if self._fd is None:
                self.journal_dir.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self._path(self._n), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                self._size = 0
            os.write(self._fd, line)
            self._size += len(line)
            if self._size >= self.segment_bytes:
                # the next segment exists before this one is closed: a reader that sees it knows this one is whole
                self._n += 1
                nxt = os.open(self._path(self._n), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.close(self._fd)
                self._fd, self._size = nxt, 0

    def submit(self, item: IndexItem) -> None:
        self._append(encode(item))

    def association_ended(self, association_uid: str, released: bool) -> None:
        self._append(encode(AssociationEnded(association_uid, released)))

    def close(self) -> None:
        """Stop writing (the segments stay for the tailer, which deletes them once committed)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


@dataclass(frozen=True, order=True)
class _Segment:
    pid: int
    token: int
    n: int
    path: Path

    @property
    def writer(self) -> tuple[int, int]:
        return (self.pid, self.token)


def _segments(journal_dir: Path) -> list[_Segment]:
    if not journal_dir.is_dir():
        return []
    out = []
    for p in journal_dir.iterdir():
        m = _SEGMENT.match(p.name)
        if m:
            out.append(_Segment(int(m[1]), int(m[2]), int(m[3]), p))
    return sorted(out)


class JournalTailer:
    """The service process's reader of every receiver's journal (a thread, and :meth:`drain` on demand).

    Each pass reads what was appended since the last one, commits the instances in batches and, in journal order,
    records the end of each association after the instances it delivered. Read positions move on only after
    their commit, so a database failure means the same lines are read again on the next pass.
    """

    def __init__(
        self,
        indexer: Indexer,
        journal_dir: Path,
        session_factory: sessionmaker[Session],
        actor: str = "dicom-node",
        interval: float = BATCH_WINDOW_S,
    ) -> None:
        self.indexer = indexer
        self.journal_dir = Path(journal_dir)
        self.session_factory = session_factory
        self.actor = actor
        self.interval = interval
        self._offsets: dict[Path, int] = {}
        self._dead: set[tuple[int, int]] = set()  # writers (pid, token) known to be gone
        self._started_reading = False  # the first drain reads segments a previous service process left
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> JournalTailer:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="journal-tailer", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        # background work: on Linux a thread is a task with its own nice value; the receivers' network threads
        # and the sender on a shared core go first, the rows follow when there is time
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        while not self._stop.wait(self.interval):
            try:
                self.drain()
            except Exception:
                log.exception("reading the receivers' index journals failed; retrying")

    def drain(self, dead_pids: set[int] | frozenset[int] = frozenset(), all_dead: bool = False) -> int:
        """Commit everything journaled so far; returns how many instance lines were read. Segments of writers
        in ``dead_pids`` (or of every writer, ``all_dead``: start-up, shut-down) are finished and deleted."""
        with self._lock:
            segments = _segments(self.journal_dir)
            # a pid names the writers that exist now; a later receiver with the same pid has another token
            self._dead |= {s.writer for s in segments if s.pid in dead_pids}
            last = {s.writer: s.n for s in segments}
            offsets = dict(self._offsets)
            pending: list[IndexItem] = []
            finished: list[Path] = []
            read = 0
            for seg in segments:
                try:
                    with open(seg.path, "rb") as f:
                        f.seek(offsets.get(seg.path, 0))
                        data = f.read()
                except FileNotFoundError:
                    continue
                whole = data[: data.rfind(b"\n") + 1]
                # read from its start by a new service process (after a crash or a stop): lines committed before
                replayed = seg.path not in self._offsets and not self._started_reading
                offsets[seg.path] = offsets.get(seg.path, 0) + len(whole)
                for line in whole.splitlines():
                    try:
                        record = decode(line, seg.pid)
                    except (ValueError, KeyError, TypeError) as exc:
                        log.error("unreadable line in %s skipped (the recovery scan covers it): %s", seg.path, exc)
                        continue
                    if isinstance(record, AssociationEnded):
                        self._commit(pending)
                        pending = []
                        end_transfers(self.session_factory, [record.association_uid], record.released, self.actor)
                        self.indexer.forget_association(record.association_uid)
                    else:
                        record.maybe_committed = replayed
                        pending.append(record)
                        read += 1
                # the writer moved on to a later segment (this one is whole) or is gone (a torn last line is
                # dropped: that file is found by the recovery scan)
                if seg.n < last[seg.writer] or all_dead or seg.writer in self._dead:
                    finished.append(seg.path)
            self._commit(pending)
            for p in finished:
                p.unlink(missing_ok=True)
                offsets.pop(p, None)
            self._offsets = offsets
            self._started_reading = True
            alive = {s.writer for s in segments if s.path not in finished}
            self._dead &= alive
            return read

    def _commit(self, items: list[IndexItem]) -> None:
        for k in range(0, len(items), BATCH):
            self.indexer.index(items[k : k + BATCH])
