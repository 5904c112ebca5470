"""The Storage SCP: C-ECHO and C-STORE for every storage SOP class and transfer syntax, access control, TLS.

``StorageSCP(settings, session_factory, on_series_complete).start()`` listens; ``stop()`` shuts it down. Each
C-STORE is written verbatim (file meta + received bytes, no decode) by :class:`dicom_node.inbound.ingest.Ingestor`,
which
answers Success once the file is durably in the store; the database row follows in the background indexer.

With ``dicom.receiver_processes`` = 1 the receiver (:class:`Receiver`) runs in this process. With more, this
process opens the listening socket and :mod:`dicom_node.inbound.receivers` starts that many receiver processes that all
accept on it (a pre-forked listener); series completion, the recovery scan and the shared association limit stay
here, in the process that owns ``on_series_complete``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import EventHandlerType
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # sop_class builds its names at import
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.config.logging import install_library_filters, log_context, printable
from lesiontrack.config.settings import Settings
from lesiontrack.config.version import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from lesiontrack.dicom_node.inbound.assoc_log import AssociationLog
from lesiontrack.dicom_node.inbound.association_guard import (
    AssociationPolicy,
    ConnectionTable,
    PeerAddress,
    install_log_filter,
    make_request_handler,
)
from lesiontrack.dicom_node.inbound.completion import (
    CompletionChecks,
    CompletionHooks,
    SeriesCallback,
    SeriesCompletion,
    TransferTracker,
    reap_transfers,
)
from lesiontrack.dicom_node.inbound.indexer import make_indexer
from lesiontrack.dicom_node.inbound.ingest import Ingestor, RequestMeta
from lesiontrack.dicom_node.inbound.journal import JournalTailer
from lesiontrack.dicom_node.inbound.pacs_count import count_from_sender
from lesiontrack.dicom_node.inbound.receivers import ReceiverPool, SharedSlots, run_dir
from lesiontrack.dicom_node.inbound.recovery import recover
from lesiontrack.dicom_node.inbound.routing import Route
from lesiontrack.dicom_node.inbound.sink import IndexSink
from lesiontrack.dicom_node.inbound.storage import InstanceStore
from lesiontrack.dicom_node.tls import server_context

log = logging.getLogger(__name__)


_UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"]
_LOSSLESS = [
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.92",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.5",
]
#: The acceptor's order decides which proposed syntax wins: keep what the sender has (lossless compressed
#: first), prefer uncompressed over anything lossy so that we never make a sender compress lossily for us.
ACCEPTED_TRANSFER_SYNTAXES = (
    _LOSSLESS + _UNCOMPRESSED + [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in _LOSSLESS and ts not in _UNCOMPRESSED]
)


def storage_root(settings: Settings) -> Path:
    return Path(settings.data_dir) / "dicom"


class _Server(ThreadedAssociationServer):
    """pynetdicom's server plus a peer-IP allow-list, TCP_NODELAY on accepted sockets and the connection table
    of :mod:`dicom_node.inbound.association_guard` (per-peer limit, eviction of idle connections). With
    ``inherited`` set it accepts on that already listening socket (shared with other receiver processes)
    instead of binding its own."""

    allowed_ips: frozenset[str] = frozenset()
    connections: ConnectionTable | None = None
    inherited: socket.socket | None = None
    shared_listener = False  # this server accepts on a socket other receiver processes share

    def server_bind(self) -> None:
        if self.inherited is None:
            super().server_bind()
            return
        if self.socket is not None:
            self.socket.close()
        self.socket = self.inherited
        self.shared_listener = True
        # non-blocking: another process may take a connection this one was woken for (accept then fails, and
        # socketserver goes back to waiting)
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.inherited is None:
            super().server_activate()

    def server_close(self) -> None:
        if not self.shared_listener:
            super().server_close()
            return
        # the listening socket is shared with the other receiver processes: close this process's descriptor
        # only (pynetdicom's shutdown(SHUT_RDWR) would stop every receiver from accepting)
        if self.socket is not None:
            self.socket.close()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = super().get_request()
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def verify_request(self, request: socket.socket | tuple[bytes, socket.socket], client_address: PeerAddress) -> bool:
        if self.allowed_ips and client_address[0] not in self.allowed_ips:
            log.warning("refused connection from %s: not in dicom.allowed_peer_ips", client_address[0])
            return False
        return self.connections is None or self.connections.admit(client_address)


_H = TypeVar("_H")


def _with_peer(handler: Callable[[Receiver, evt.Event], _H]) -> Callable[[Receiver, evt.Event], _H]:
    """Run an event handler with the association's peer (calling AE@address) in the log context."""

    @functools.wraps(handler)
    def wrapped(self: Receiver, event: evt.Event) -> _H:
        r = event.assoc.requestor
        host = r.address[0] if isinstance(r.address, tuple) else r.address
        with log_context(peer=f"{printable(r.ae_title)}@{host}"):
            return handler(self, event)

    return wrapped


class Receiver:
    """One pynetdicom Storage SCP: the network server, the ingestor, the association guard.

    Runs inside the service process (``receiver_processes`` = 1) or alone in a receiver process
    (:mod:`dicom_node.inbound.receivers`); ``sink`` is where stored instances and association ends go: the service
    process's indexer, or in a receiver process its journal for the service process's indexer (no database
    write on the network threads); ``listen_socket`` is the shared listening socket in the latter case,
    ``slots`` the association counter all receiver processes share.
    """

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        sink: IndexSink,
        listen_socket: socket.socket | None = None,
        slots: SharedSlots | None = None,
    ) -> None:
        self.settings = settings
        cfg = settings.dicom
        self.store = InstanceStore(storage_root(settings), fsync=cfg.fsync)
        self.ingestor = Ingestor(self.store, session_factory, sink=sink)
        self.transfers = TransferTracker(sink)
        self.policy = AssociationPolicy.from_settings(cfg)
        self.connections = ConnectionTable(self.policy, slots)
        self.associations = AssociationLog()
        self.listen_socket = listen_socket
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._ae: AE | None = None

    def _make_ae(self) -> AE:
        return make_ae(self.settings)

    def start(self) -> Receiver:
        if self._server is not None:
            return self
        cfg = self.settings.dicom
        ae = self._make_ae()
        handlers: list[EventHandlerType] = [
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_CONN_CLOSE, self._on_close),
            (evt.EVT_ACSE_RECV, self._on_acse_recv),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        _Server.inherited = self.listen_socket  # read by server_bind during construction
        try:
            server = ae.make_server(
                (cfg.bind_address, cfg.port),
                ae_title=cfg.ae_title,
                ssl_context=server_context(cfg.tls),
                evt_handlers=handlers,
                server_class=_Server,
                request_handler=make_request_handler(self.connections, self.policy),
            )
        finally:
            _Server.inherited = None
        if not isinstance(server, _Server):
            raise RuntimeError(f"pynetdicom built a {type(server).__name__}, not the storage server class")
        server.allowed_ips = frozenset(cfg.allowed_peer_ips)
        server.connections = self.connections
        install_log_filter()
        install_library_filters()
        ae._servers.append(server)  # so AE.shutdown() and server.shutdown() agree
        self._ae, self._server = ae, server
        self._thread = threading.Thread(target=server.serve_forever, name="storage-scp", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None
        self.ingestor.close()

    @property
    def port(self) -> int:
        if self._server is None:
            return self.settings.dicom.port
        return int(self._server.server_address[1])

    @property
    def active_associations(self) -> int:
        return 0 if self._server is None else len(self._server.active_associations)

    # -- handlers ----------------------------------------------------------------------------------------------
    @_with_peer
    def _on_accepted(self, event: evt.Event) -> None:
        r = event.assoc.requestor
        self.associations.accepted(id(event.assoc), printable(r.ae_title), f"{r.address}:{r.port}")

    @_with_peer
    def _on_released(self, event: evt.Event) -> None:
        self.associations.ended(id(event.assoc), "released")

    @_with_peer
    def _on_echo(self, event: evt.Event) -> int:
        self.associations.echo(id(event.assoc))
        return 0x0000

    def _on_store(self, event: evt.Event) -> Dataset | int:
        """The hot path: no logging above DEBUG, no database round trip (the indexer records the row)."""
        assoc = event.assoc
        requestor = assoc.requestor
        assoc_uid = getattr(assoc, "lesiontrack_uid", None)
        if assoc_uid is None:
            assoc_uid = str(uuid.uuid4())
            assoc.lesiontrack_uid = assoc_uid  # type: ignore[attr-defined]  # our id, attached once
        req = event.request
        if not isinstance(req, C_STORE) or req.DataSet is None:
            raise RuntimeError("EVT_C_STORE without a C-STORE request")  # pynetdicom never does this
        data = req.DataSet.getvalue()
        calling_ae = printable(requestor.ae_title)
        meta = RequestMeta(
            str(req.AffectedSOPClassUID or ""),
            str(req.AffectedSOPInstanceUID or ""),
            str(event.context.transfer_syntax),
        )
        try:
            result = self.ingestor.receive(
                meta,
                data,
                calling_ae=calling_ae,
                peer=str(requestor.address),
                association=assoc_uid,
            )
            self.associations.store(id(assoc), len(data), result.ok, result.duplicate, result.series_uid)
        except Exception as exc:
            self.associations.store(id(assoc), len(data), False)
            with log_context(peer=f"{calling_ae}@{requestor.address}"):
                log.exception("unexpected failure storing an instance from %s", calling_ae)
            status = Dataset()
            status.Status = 0xA700
            status.ErrorComment = f"internal error: {type(exc).__name__}"[:64]
            return status
        if result.ok:
            return 0x0000
        status = Dataset()
        status.Status = result.status
        status.ErrorComment = result.comment.replace("\\", "/")[:64]  # LO: a backslash would split the value
        return status

    def _on_acse_recv(self, event: evt.Event) -> None:
        primitive = getattr(event, "primitive", None)
        if isinstance(primitive, A_RELEASE) and primitive.result is None:  # the peer's A-RELEASE-RQ
            self.transfers.association_released(getattr(event.assoc, "lesiontrack_uid", None))

    @_with_peer
    def _on_close(self, event: evt.Event) -> None:
        assoc = event.assoc
        uid = getattr(assoc, "lesiontrack_uid", None)
        self.transfers.association_closed(uid, released=bool(assoc.is_released))
        self.associations.closed(id(assoc))

    @_with_peer
    def _on_aborted(self, event: evt.Event) -> None:
        self.associations.ended(id(event.assoc), "aborted")

    @_with_peer
    def _on_rejected(self, event: evt.Event) -> None:
        r = event.assoc.requestor
        log.warning("association from %s (%s) rejected", printable(r.ae_title), r.address)


def make_ae(settings: Settings) -> AE:
    cfg = settings.dicom
    ae = AE(ae_title=cfg.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    # association slots are counted by the guard's connection table (only connections whose A-ASSOCIATE-RQ
    # arrived hold one); pynetdicom's own count, which includes idle connections, is only a backstop
    ae.maximum_associations = cfg.max_associations + cfg.max_pending_connections + 8
    ae.maximum_pdu_size = cfg.maximum_pdu_size
    ae.require_calling_aet = list(cfg.allowed_calling_aes)
    ae.require_called_aet = cfg.require_called_ae
    policy = AssociationPolicy.from_settings(cfg)
    ae.acse_timeout = policy.acse_timeout
    ae.dimse_timeout = policy.dimse_timeout
    ae.network_timeout = policy.network_timeout
    ae.add_supported_context(Verification, _UNCOMPRESSED)
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:  # always set in pynetdicom's list; typed Optional
            ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    return ae


class StorageSCP:
    """Our DICOM listener; reusable by ``lesiontrack serve`` and by tests (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        on_series_complete: SeriesCallback | None = None,
        on_annotation_complete: SeriesCallback | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        cfg = settings.dicom
        self.processes = receiver_processes(cfg.receiver_processes)
        self.store = InstanceStore(storage_root(settings), fsync=cfg.fsync)
        self.completion = SeriesCompletion(
            session_factory,
            settings.routing,
            cfg.series_quiet_seconds,
            CompletionHooks(
                on_series_complete=on_series_complete,
                on_annotation_complete=on_annotation_complete,
                settle=self.settle,
                housekeeping=self._housekeeping,
            ),
            checks=CompletionChecks(
                analyse_incomplete=cfg.analyse_incomplete_transfers,
                count_source=functools.partial(count_from_sender, settings, session_factory),
            ),
            trigger_wait_seconds=cfg.trigger_wait_seconds,
        )
        #: this process's indexer: the one writer of instance rows, whatever the number of receivers
        self.indexer = make_indexer(self.store, session_factory)
        #: in-process receiver (receiver_processes = 1): also the ingestor retrievals use
        self.receiver: Receiver | None = (
            Receiver(settings, session_factory, self.indexer) if self.processes == 1 else None
        )
        self.ingestor = (
            self.receiver.ingestor
            if self.receiver is not None
            else Ingestor(self.store, session_factory, sink=self.indexer)
        )
        #: receiver processes journal what they stored; this process commits it (one writer to the database)
        self.tailer = JournalTailer(self.indexer, run_dir(settings), session_factory)
        self.pool: ReceiverPool | None = None
        self._started = False

    def _make_ae(self) -> AE:
        return make_ae(self.settings)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> StorageSCP:
        if self._started:
            return self
        cfg = self.settings.dicom
        self.store.root.mkdir(parents=True, exist_ok=True)
        removed = self.store.remove_orphan_tmp()
        if removed:
            log.warning("removed %d temporary files left by an interrupted write", removed)
        # nothing receives yet: index what a crash left acknowledged but without a row (the receivers' journals,
        # then every file still without one), then end the transfers it cut off (as dropped)
        self.tailer.drain(all_dead=True)
        for stale in run_dir(self.settings).glob("index-pending-*.journal"):  # an older version's; scan covers it
            stale.unlink(missing_ok=True)
        recover(self.indexer, min_age=0.0, state_dir=run_dir(self.settings))
        self.completion.resume_from_db()
        if self.receiver is not None:
            self.indexer.start()
            self.receiver.start()
        else:
            self.pool = ReceiverPool(self.settings, self.processes, on_death=self._receiver_died).start()
            self.tailer.start()
        self._started = True
        self.completion.start()
        log.info(
            "Storage SCP %s listening on %s:%d%s, %d receiver process%s",
            cfg.ae_title,
            cfg.bind_address,
            self.port,
            " (TLS)" if cfg.tls.enabled else "",
            self.processes,
            "" if self.processes == 1 else "es",
        )
        return self

    def stop(self) -> None:
        self.completion.stop()
        if self.receiver is not None:
            self.receiver.stop()
        if self.pool is not None:
            self.pool.stop()
            self.pool = None
            self.tailer.stop()
            self.tailer.drain(all_dead=True)  # what the receivers journaled before they stopped
        self.ingestor.close()
        self._started = False

    def __enter__(self) -> StorageSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self.receiver is not None:
            return self.receiver.port
        if self.pool is not None:
            return self.pool.port
        return self.settings.dicom.port

    @property
    def active_associations(self) -> int:
        if self.receiver is not None:
            return self.receiver.active_associations
        return 0 if self.pool is None else self.pool.slots.total()

    def receiver_pids(self) -> list[int]:
        """The receiver processes' ids (this process's own when it receives in-process)."""
        return [os.getpid()] if self.receiver is not None else [] if self.pool is None else self.pool.pids()

    def settle(self, timeout: float = 60.0) -> bool:
        """Wait until everything acknowledged so far has its row (tests, benchmarks)."""
        if self.pool is not None:
            self.tailer.drain()
        return self.indexer.flush(timeout)

    def force_complete(self, series_uid: str) -> Route | None:
        return self.completion.force_complete(series_uid)

    # -- crash recovery ----------------------------------------------------------------------------------------
    def _receiver_died(self, pid: int) -> None:
        """A receiver process ended unexpectedly (e.g. kill -9): index what it acknowledged, end its transfers."""
        self.tailer.drain(dead_pids={pid})
        n = reap_transfers(self.session_factory, [pid])
        if n:
            log.warning("receiver process %d died with %d associations open: counted as dropped", pid, n)

    def _housekeeping(self) -> None:
        """Periodic safety net: files without a row older than a minute, temporary files older than an hour,
        open transfers of receiver processes that are gone (if recovering after a death failed). What is waiting
        to be indexed is committed first, so a backlog is not mistaken for a crash's leftovers."""
        self.settle()
        n = reap_transfers(self.session_factory, alive={os.getpid(), *self.receiver_pids()})
        if n:
            log.warning("%d associations of receiver processes that are gone counted as dropped", n)
        recover(self.indexer, state_dir=run_dir(self.settings))
        self.store.remove_orphan_tmp(min_age=3600.0)


def receiver_processes(configured: int) -> int:
    """``dicom.receiver_processes``; 0 = one per CPU core."""
    return configured if configured > 0 else max(1, os.cpu_count() or 1)
