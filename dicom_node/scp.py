"""The Storage SCP: C-ECHO and C-STORE for every storage SOP class and transfer syntax, access control, TLS.

``StorageSCP(settings, session_factory, on_series_complete).start()`` listens in background threads; ``stop()``
shuts it down. Each C-STORE is written verbatim (file meta + received bytes, no decode) by
:class:`dicom_node.ingest.Ingestor`, which answers Success only after the file and its database row are durable.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # sop_class builds its names at import
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from config.logging import log_context
from config.settings import Settings
from dicom_node.assoc_log import AssociationLog
from dicom_node.association_guard import AssociationPolicy, ConnectionTable, install_log_filter, make_request_handler
from dicom_node.completion import SeriesCallback, SeriesCompletion
from dicom_node.ingest import Ingestor
from dicom_node.routing import Route
from dicom_node.storage import InstanceStore
from dicom_node.tls import server_context

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
    of :mod:`dicom_node.association_guard` (per-peer limit, eviction of idle connections)."""

    allowed_ips: frozenset[str] = frozenset()
    connections: ConnectionTable | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self.allowed_ips and client_address[0] not in self.allowed_ips:
            log.warning("refused connection from %s: not in dicom.allowed_peer_ips", client_address[0])
            return False
        if self.connections is not None and not self.connections.admit(client_address):
            return False
        return True


_H = TypeVar("_H")


def _with_peer(handler: Callable[[StorageSCP, evt.Event], _H]) -> Callable[[StorageSCP, evt.Event], _H]:
    """Run an event handler with the association's peer (calling AE@address) in the log context."""

    @functools.wraps(handler)
    def wrapped(self: StorageSCP, event: evt.Event) -> _H:
        r = event.assoc.requestor
        host = r.address[0] if isinstance(r.address, tuple) else r.address
        with log_context(peer=f"{r.ae_title}@{host}"):
            return handler(self, event)

    return wrapped


class StorageSCP:
    """Our DICOM listener; reusable by ``lesiontrack serve`` and by tests."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        on_series_complete: SeriesCallback | None = None,
        on_annotation_complete: SeriesCallback | None = None,
    ) -> None:
        self.settings = settings
        cfg = settings.dicom
        self.store = InstanceStore(storage_root(settings), fsync=cfg.fsync)
        self.ingestor = Ingestor(self.store, session_factory)
        self.completion = SeriesCompletion(
            session_factory,
            settings.routing,
            cfg.series_quiet_seconds,
            on_series_complete,
            analyse_incomplete=cfg.analyse_incomplete_transfers,
            on_annotation_complete=on_annotation_complete,
        )
        self.policy = AssociationPolicy.from_settings(cfg)
        self.connections = ConnectionTable(self.policy)
        self.associations = AssociationLog()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._ae: AE | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def _make_ae(self) -> AE:
        cfg = self.settings.dicom
        ae = AE(ae_title=cfg.ae_title)
        # association slots are counted by the guard's connection table (only connections whose A-ASSOCIATE-RQ
        # arrived hold one); pynetdicom's own count, which includes idle connections, is only a backstop
        ae.maximum_associations = cfg.max_associations + cfg.max_pending_connections + 8
        ae.maximum_pdu_size = cfg.maximum_pdu_size
        ae.require_calling_aet = list(cfg.allowed_calling_aes)
        ae.require_called_aet = cfg.require_called_ae
        policy = AssociationPolicy.from_settings(cfg)  # from settings: conformance builds this AE without an SCP
        ae.acse_timeout = policy.acse_timeout
        ae.dimse_timeout = policy.dimse_timeout
        ae.network_timeout = policy.network_timeout
        ae.add_supported_context(Verification, _UNCOMPRESSED)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:  # always set in pynetdicom's list; typed Optional
                ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        return ae

    def start(self) -> StorageSCP:
        if self._server is not None:
            return self
        cfg = self.settings.dicom
        self.store.root.mkdir(parents=True, exist_ok=True)
        removed = self.store.remove_orphan_tmp()
        if removed:
            log.warning("removed %d temporary files left by an interrupted write", removed)
        self.completion.resume_from_db()
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
        server = ae.make_server(
            (cfg.bind_address, cfg.port),
            ae_title=cfg.ae_title,
            ssl_context=server_context(cfg.tls),
            evt_handlers=handlers,
            server_class=_Server,
            request_handler=make_request_handler(self.connections, self.policy),
        )
        if not isinstance(server, _Server):
            raise RuntimeError(f"pynetdicom built a {type(server).__name__}, not the storage server class")
        server.allowed_ips = frozenset(cfg.allowed_peer_ips)
        server.connections = self.connections
        install_log_filter()
        ae._servers.append(server)  # so AE.shutdown() and server.shutdown() agree
        self._ae, self._server = ae, server
        self._thread = threading.Thread(target=server.serve_forever, name="storage-scp", daemon=True)
        self._thread.start()
        self.completion.start()
        log.info(
            "Storage SCP %s listening on %s:%d%s",
            cfg.ae_title,
            cfg.bind_address,
            self.port,
            " (TLS)" if cfg.tls.enabled else "",
        )
        return self

    def stop(self) -> None:
        self.completion.stop()
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

    def __enter__(self) -> StorageSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            return self.settings.dicom.port
        return int(self._server.server_address[1])

    @property
    def active_associations(self) -> int:
        return 0 if self._server is None else len(self._server.active_associations)

    def force_complete(self, series_uid: str) -> Route | None:
        return self.completion.force_complete(series_uid)

    # -- handlers ----------------------------------------------------------------------------------------------
    @_with_peer
    def _on_accepted(self, event: evt.Event) -> None:
        r = event.assoc.requestor
        self.associations.accepted(id(event.assoc), r.ae_title, f"{r.address}:{r.port}")

    @_with_peer
    def _on_released(self, event: evt.Event) -> None:
        self.associations.ended(id(event.assoc), "released")

    @_with_peer
    def _on_echo(self, event: evt.Event) -> int:
        self.associations.echo(id(event.assoc))
        return 0x0000

    @_with_peer
    def _on_store(self, event: evt.Event) -> Dataset | int:
        requestor = event.assoc.requestor
        assoc_uid = getattr(event.assoc, "lesiontrack_uid", None)
        if assoc_uid is None:
            assoc_uid = str(uuid.uuid4())
            event.assoc.lesiontrack_uid = assoc_uid  # type: ignore[attr-defined]  # our id, attached once
        data = event.encoded_dataset(include_meta=False)
        try:
            result = self.ingestor.ingest(
                event.file_meta,
                data,
                calling_ae=requestor.ae_title,
                peer=str(requestor.address),
                association=assoc_uid,
            )
            self.associations.store(id(event.assoc), len(data), result.ok, result.duplicate, result.series_uid)
        except Exception as exc:
            self.associations.store(id(event.assoc), len(data), False)
            log.exception("unexpected failure storing an instance from %s", requestor.ae_title)
            status = Dataset()
            status.Status = 0xA700
            status.ErrorComment = f"internal error: {type(exc).__name__}"[:64]
            return status
        if result.ok:
            if result.series_uid and not result.duplicate:
                self.completion.instance_received(result.series_uid, id(event.assoc))
            elif result.series_uid:
                self.completion.series_touched(result.series_uid, id(event.assoc))
            return 0x0000
        status = Dataset()
        status.Status = result.status
        status.ErrorComment = result.comment.replace("\\", "/")[:64]  # LO: a backslash would split the value
        return status

    def _on_acse_recv(self, event: evt.Event) -> None:
        from pynetdicom.pdu_primitives import A_RELEASE

        primitive = getattr(event, "primitive", None)
        if isinstance(primitive, A_RELEASE) and primitive.result is None:  # the peer's A-RELEASE-RQ
            self.completion.association_released(id(event.assoc))

    @_with_peer
    def _on_close(self, event: evt.Event) -> None:
        assoc = event.assoc
        self.completion.association_closed(
            id(assoc), released=bool(assoc.is_released), association_uid=getattr(assoc, "lesiontrack_uid", None)
        )
        self.associations.closed(id(assoc))

    @_with_peer
    def _on_aborted(self, event: evt.Event) -> None:
        self.associations.ended(id(event.assoc), "aborted")

    @_with_peer
    def _on_rejected(self, event: evt.Event) -> None:
        log.warning("association from %s (%s) rejected", event.assoc.requestor.ae_title, event.assoc.requestor.address)
