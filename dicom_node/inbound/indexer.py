"""The background indexer: database rows for instances that are already durably on disk (issue 18).

The Storage SCP answers Success once a received instance is renamed into the store
(:meth:`dicom_node.inbound.storage.InstanceStore.put`); the network thread then hands an :class:`IndexItem` to the
:class:`Indexer`, whose thread commits them in batches (group commit): the instance rows, the series counters,
the hierarchy (patient/study/series, created or re-opened through the ORM), the SHA-256 of the dataset bytes
(read back from the file, so nothing large waits in memory) and the open-transfer rows that series completion
shares between receiver processes (:class:`db.models.OpenTransfer`).

Nothing acknowledged can be lost: :func:`dicom_node.inbound.recovery.recover` walks the store and indexes every
file without a row (at start-up, after a receiver process died, and periodically). Such a file was acknowledged by a
process that died before its commit, so it is marked ``transfer_incomplete`` and its series' last transfer ``aborted``:
the series is held until it is re-sent over an association that ends with an A-RELEASE (see
:mod:`dicom_node.inbound.integrity`). The (SOP Instance UID, SHA-256) unique constraint keeps a row from being written
twice when a re-sent copy, the recovery scan and the first copy's indexer race each other.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Connection, Engine, bindparam, event, func, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.db.models import Instance, OpenTransfer, Series, SeriesState, TransferOutcome
from lesiontrack.db.repository import audit, get_or_create_patient, get_or_create_series, get_or_create_study
from lesiontrack.db.session import make_engine, session_scope
from lesiontrack.dicom_node.inbound.completion import end_transfers
from lesiontrack.dicom_node.inbound.sink import IndexItem
from lesiontrack.dicom_node.inbound.storage import InstanceStore, dataset_offset, sha256_hex

log = logging.getLogger(__name__)

#: the most items one transaction commits
BATCH = 256
#: how long the indexer gathers items before it commits (unless a flush waits): latency of the row, not of Success
BATCH_WINDOW_S = 0.25
#: a file younger than this is left to the live indexer that wrote it (the periodic scan picks it up later)
RECOVER_MIN_AGE_S = 60.0

_BUMP = (
    update(Series)
    .where(Series.id == bindparam("pk"), Series.state == SeriesState.RECEIVING)
    .values(
        instance_count=Series.instance_count + bindparam("n"),
        last_received_at=bindparam("now"),
        first_received_at=func.coalesce(Series.first_received_at, bindparam("now")),
    )
)


@dataclass(frozen=True)
class _Row:
    """An instance row as the batch sees it (from the database, or added earlier in the same batch)."""

    id: int
    sop_instance_uid: str
    sha256: str
    file_path: str


class _SeriesNotReceiving(Exception):
    """A cached series was completed meanwhile: the batch is retried through the ORM path, which re-opens it."""


class Indexer:
    """A queue and one thread; ``submit`` never touches the database, ``flush`` waits for what was submitted."""

    def __init__(
        self,
        store: InstanceStore,
        session_factory: sessionmaker[Session],
        engine: Engine | None = None,
        actor: str = "dicom-node",
        own_engine: bool = False,
    ) -> None:
        self.store = store
        self.session_factory = session_factory
        self.engine: Engine = engine if engine is not None else session_factory.kw["bind"]
        self.actor = actor
        self._own_engine = own_engine  # disposed by close()
        self.pid = os.getpid()
        self._queue: queue.Queue[IndexItem | None] = queue.Queue()
        self._series_pk: dict[str, int] = {}
        self._open_pairs: set[tuple[str, str]] = set()
        self._lock = threading.Lock()  # one batch at a time (the thread, or a synchronous caller)
        self._thread: threading.Thread | None = None
        self._submitted = 0
        self._committed = 0
        self._flushing = 0  # callers waiting in flush(): commit without gathering more
        self._wake = threading.Event()
        self._cond = threading.Condition()

    # -- producer side -----------------------------------------------------------------------------------------
    def submit(self, item: IndexItem) -> None:
        """Queue ``item`` (a crash before its commit is covered by the recovery scan at start-up)."""
        with self._cond:
            self._submitted += 1
            if self._submitted - self._committed > BATCH:
                item.data = None  # a long queue (database busy) keeps paths, not half-megabyte datasets
        self._queue.put(item)
        if self._thread is None:
            self.start()

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until everything submitted so far is committed (or failed); False on timeout."""
        with self._cond:
            target = self._submitted
            self._flushing += 1
            if self._committed < target:
                self._wake.set()  # ends the indexer's gathering window now
            try:
                return self._cond.wait_for(lambda: self._committed >= target, timeout)
            finally:
                self._flushing -= 1

    def association_ended(self, association_uid: str, released: bool) -> None:
        """Record how an association ended once what it delivered is committed (:class:`IndexSink`)."""
        self.flush()
        try:
            end_transfers(self.session_factory, [association_uid], released, self.actor)
        except Exception:
            log.exception("recording how an association ended failed")
        self.forget_association(association_uid)

    def forget_association(self, association_uid: str) -> None:
        with self._lock:
            self._open_pairs = {p for p in self._open_pairs if p[0] != association_uid}

    # -- thread ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="indexer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self.flush(timeout)
        self._queue.put(None)
        self._wake.set()
        self._thread.join(timeout)
        self._thread = None

    def close(self) -> None:
        """Commit what was submitted, stop the thread, dispose of the engine :func:`make_indexer` made."""
        self.stop()
        if self._own_engine:
            self.engine.dispose()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            items = [first]
            stop = False
            # group commit: gather what arrives within BATCH_WINDOW_S (or until someone waits in flush), so the
            # per-transaction cost is shared by many instances
            # (sleeping on an event, not on the queue, so that each put does not wake this thread)
            if not self._flushing:
                self._wake.wait(BATCH_WINDOW_S)
            self._wake.clear()
            while len(items) < BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                items.append(nxt)
            try:
                self.index(items)
            except Exception:
                log.exception("indexing %d instances failed; the recovery scan will retry", len(items))
            finally:
                with self._cond:
                    self._committed += len(items)
                    self._cond.notify_all()
            if stop:
                return

    # -- the commit --------------------------------------------------------------------------------------------
    def index(self, items: list[IndexItem]) -> None:
        """Commit rows for ``items`` (group commit); on a conflict the batch is retried item by item."""
        if any(it.maybe_committed for it in items):
            items = self._not_yet_committed(items)
            if not items:
                return
        with self._lock:
            for attempt in range(6):
                try:
                    self._ensure_series(items)
                    self._commit_batch(items)
                    return
                except _SeriesNotReceiving as exc:
                    self._series_pk.pop(str(exc), None)
                except IntegrityError:
                    if len(items) > 1:
                        for it in items:  # another process indexed one of them (or created a series) first
                            self.index_one(it)
                        return
                    self._series_pk.clear()
                except OperationalError as exc:
                    if "locked" not in str(exc).lower() or attempt == 5:
                        raise
                    time.sleep(0.05 * (attempt + 1))

    def _not_yet_committed(self, items: list[IndexItem]) -> list[IndexItem]:
        """``items`` less the replayed ones whose file already has its row (a journal read again after a crash:
        a completed series must not re-open, and complete and trigger again, for what it already holds)."""
        sops = sorted({it.sop_uid for it in items if it.maybe_committed})
        with self.engine.connect() as c:
            indexed = set(c.scalars(select(Instance.file_path).where(Instance.sop_instance_uid.in_(sops))))
        return [it for it in items if not (it.maybe_committed and str(it.path) in indexed)]

    def index_one(self, item: IndexItem) -> None:
        for _attempt in range(4):
            try:
                self._ensure_series([item])
                self._commit_batch([item])
                return
            except _SeriesNotReceiving as exc:
                self._series_pk.pop(str(exc), None)
            except IntegrityError:
                self._series_pk.clear()  # a series created by another process, or a row already there
            except SQLAlchemyError as exc:
                item.error = str(exc)
                log.error("cannot index %s: %s", item.path, exc)
                return
        item.error = "conflicting rows on every attempt"
        log.warning("cannot index %s: conflicting rows on every attempt (the recovery scan retries it)", item.path)

    def _ensure_series(self, items: list[IndexItem]) -> None:
        """Create (or re-open) through the ORM every series of ``items`` not known to be receiving."""
        todo: dict[str, IndexItem] = {}
        for it in items:
            if it.series_uid not in self._series_pk:
                todo.setdefault(it.series_uid, it)
        if not todo:
            return
        with session_scope(self.session_factory) as s:
            for uid, it in todo.items():
                self._series_pk[uid] = self._series_row(s, it).id
        if len(self._series_pk) > 10000:
            self._series_pk = {k: v for k, v in self._series_pk.items() if k in todo}

    def _series_row(self, s: Session, it: IndexItem) -> Series:
        patient = get_or_create_patient(s, it.s("PatientID", 64) or "", it.s("IssuerOfPatientID", 64))
        study = get_or_create_study(
            s,
            patient,
            it.header["StudyInstanceUID"],
            study_date=it.s("StudyDate", 8),
            study_time=it.s("StudyTime", 16),
            accession_number=it.s("AccessionNumber", 16),
        )
        series = get_or_create_series(
            s,
            study,
            it.series_uid,
            modality=it.s("Modality", 16),
            series_number=it.i("SeriesNumber"),
            series_description=it.s("SeriesDescription", 64),
            body_part=it.s("BodyPartExamined", 16),
            frame_of_reference_uid=it.s("FrameOfReferenceUID", 64),
        )
        # rows created ahead of a prior retrieval carry only what C-FIND said: fill the gaps from the header
        for attr, value in (
            ("modality", it.s("Modality", 16)),
            ("series_number", it.i("SeriesNumber")),
            ("series_description", it.s("SeriesDescription", 64)),
            ("body_part", it.s("BodyPartExamined", 16)),
            ("frame_of_reference_uid", it.s("FrameOfReferenceUID", 64)),
        ):
            if getattr(series, attr) is None and value is not None:
                setattr(series, attr, value)
        if study.study_date is None and it.s("StudyDate", 8):
            study.study_date, study.study_time = it.s("StudyDate", 8), it.s("StudyTime", 16)
        if series.state == SeriesState.COMPLETE:
            series.state = SeriesState.RECEIVING
            audit(s, self.actor, "series.reopened", "series", series.series_instance_uid,
                  sop_instance_uid=it.sop_uid, calling_ae=it.calling_ae)  # fmt: skip
        s.flush()
        return series

    def _commit_batch(self, items: list[IndexItem]) -> None:
        hashes = {id(it): sha256_hex(it.data) if it.data is not None else _file_sha(it.path) for it in items}
        for it in items:
            it.data = None
        with self.engine.begin() as c:
            sops = sorted({it.sop_uid for it in items})
            known: dict[str, list[_Row]] = {}
            for row in c.execute(
                select(Instance.id, Instance.sop_instance_uid, Instance.sha256, Instance.file_path).where(
                    Instance.sop_instance_uid.in_(sops)
                )
            ):
                known.setdefault(row.sop_instance_uid, []).append(_Row(*row))
            new_rows: list[dict[str, object]] = []
            bumps: dict[int, tuple[int, datetime]] = {}
            conflicts: list[tuple[IndexItem, str, list[_Row]]] = []
            fixed_paths: list[dict[str, object]] = []
            recovered_series: set[int] = set()
            pairs: dict[tuple[str, str], int] = {}  # (association, series) -> receiver process
            new_keys: set[tuple[str, str]] = set()
            for it in items:
                sha = hashes[id(it)]
                if sha is None:  # the file is gone (removed by an operator): nothing to index
                    it.error = "file missing"
                    continue
                pk = self._series_pk[it.series_uid]
                if it.association_uid and (it.association_uid, it.series_uid) not in self._open_pairs:
                    pairs.setdefault((it.association_uid, it.series_uid), it.receiver_pid or self.pid)
                rows = known.get(it.sop_uid, [])
                same = next((r for r in rows if r.sha256 == sha), None)
                if same is not None or (it.sop_uid, sha) in new_keys:
                    if same is not None and same.file_path != str(it.path) and not Path(same.file_path).is_file():
                        fixed_paths.append({"pk": same.id, "fp": str(it.path)})  # its file had vanished
                    continue  # identical bytes already indexed: idempotent
                other = [r for r in rows if r.sha256 != sha]
                if other:
                    conflicts.append((it, sha, other))
                new_keys.add((it.sop_uid, sha))
                # a later item of this batch with the same UID and other bytes conflicts with this one
                known.setdefault(it.sop_uid, []).append(_Row(-1, it.sop_uid, sha, str(it.path)))
                new_rows.append(_instance_row(it, pk, sha))
                n, last = bumps.get(pk, (0, it.received_at))
                bumps[pk] = (n + 1, max(last, it.received_at))
                if it.recovered:
                    recovered_series.add(pk)
            for pk, (n, last) in bumps.items():
                if c.execute(_BUMP, {"pk": pk, "n": n, "now": last}).rowcount != 1:
                    uid = next(k for k, v in self._series_pk.items() if v == pk)
                    raise _SeriesNotReceiving(uid)
            opened = (pairs, sorted({self._series_pk[s] for _a, s in pairs}))
            _write_batch(c, new_rows, fixed_paths, opened, recovered_series)
        self._open_pairs.update(pairs)
        if conflicts:
            self._audit_conflicts(conflicts)

    def _audit_conflicts(self, conflicts: list[tuple[IndexItem, str, list[_Row]]]) -> None:
        try:
            with session_scope(self.session_factory) as s:
                for it, sha, other in conflicts:
                    audit(
                        s,
                        self.actor,
                        "instance.duplicate_uid_different_bytes",
                        "instance",
                        it.sop_uid,
                        kept=[r.file_path for r in other] + [str(it.path)],
                        sha256_new=sha,
                        sha256_known=[r.sha256 for r in other],
                        calling_ae=it.calling_ae,
                        peer=it.peer,
                    )
                    log.warning("SOP Instance UID %s received again with different bytes: both kept", it.sop_uid)
        except SQLAlchemyError as exc:
            log.error("cannot audit %d different-bytes duplicates: %s", len(conflicts), exc)


def make_indexer(store: InstanceStore, session_factory: sessionmaker[Session], actor: str = "dicom-node") -> Indexer:
    """This process's indexer for ``store``. With fsync off for files, SQLite's WAL is not fsync'ed on every
    commit either (an engine of its own): the database stays consistent, and a power cut may lose the last
    commits, exactly like the unsynced files."""
    engine: Engine = session_factory.kw["bind"]
    if store.fsync or engine.dialect.name != "sqlite":
        return Indexer(store, session_factory, engine=engine, actor=actor)
    own = make_engine(engine.url.render_as_string(hide_password=False))

    @event.listens_for(own, "connect")
    def _normal_sync(dbapi_conn: sqlite3.Connection, _record: object) -> None:
        dbapi_conn.execute("PRAGMA synchronous=NORMAL")

    return Indexer(store, session_factory, engine=own, actor=actor, own_engine=True)


def _instance_row(it: IndexItem, pk: int, sha: str) -> dict[str, object]:
    """The ``instance`` table row of an indexed item (column → value, for a bulk insert)."""
    return dict(
        sop_instance_uid=it.sop_uid,
        sop_class_uid=it.sop_class_uid,
        series_pk=pk,
        transfer_syntax_uid=it.transfer_syntax_uid,
        file_path=str(it.path),
        size_bytes=it.size,
        sha256=sha,
        instance_number=it.i("InstanceNumber"),
        sender_ae=(it.calling_ae or "")[:16] or None,
        received_at=it.received_at,
        association_uid=it.association_uid,
        transfer_incomplete=it.recovered,
    )


def _write_batch(
    c: Connection,
    new_rows: list[dict[str, object]],
    fixed_paths: list[dict[str, object]],
    opened: tuple[dict[tuple[str, str], int], list[int]],
    recovered_series: set[int],
) -> None:
    """Insert the batch's new instance rows, re-point rows whose file had vanished, record the transfers now under
    way (``opened`` = (association, series) → receiver process, and their series), then mark the series whose
    instances were recovered from an interrupted transfer (in this order: a recovered series ends ABORTED)."""
    if new_rows:
        c.execute(insert(Instance), new_rows)
    if fixed_paths:
        c.execute(
            update(Instance).where(Instance.id == bindparam("pk")).values(file_path=bindparam("fp")),
            fixed_paths,
        )
    pairs, open_series = opened
    if pairs:
        _record_open_transfers(c, pairs, open_series)
    if recovered_series:
        c.execute(
            update(Series).where(Series.id.in_(sorted(recovered_series))).values(last_transfer=TransferOutcome.ABORTED)
        )


def _record_open_transfers(c: Connection, pairs: dict[tuple[str, str], int], series_pks: list[int]) -> None:
    """Record the (association, series) transfers now under way (→ receiver process) and mark their series open."""
    # a journal read again after a crash may name a transfer whose row a previous process wrote:
    # inserting it again would fail the whole batch (and leave its instances to the recovery scan)
    known_pairs = set(
        c.execute(
            select(OpenTransfer.association_uid, OpenTransfer.series_uid).where(
                OpenTransfer.association_uid.in_(sorted({a for a, _s in pairs}))
            )
        ).tuples()
    )
    fresh = [
        {"association_uid": a, "series_uid": s, "pid": pid, "opened_at": datetime.now(UTC)}
        for (a, s), pid in pairs.items()
        if (a, s) not in known_pairs
    ]
    if fresh:
        c.execute(insert(OpenTransfer), fresh)
    c.execute(update(Series).where(Series.id.in_(series_pks)).values(last_transfer=TransferOutcome.OPEN))


def _file_sha(path: Path) -> str | None:
    """SHA-256 of the dataset bytes of a stored file (its file meta excluded, as the C-STORE carried them)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    return sha256_hex(memoryview(raw)[dataset_offset(raw) :])
