"""Association-level defences for the Storage SCP: nobody who can connect can hold the DICOM port.

pynetdicom reads a PDU by trusting its declared length and blocking until that many bytes arrived, counts a TCP
connection that never sent an A-ASSOCIATE-RQ as one of ``maximum_associations``, and answers some malformed
requests with nothing at all. This module replaces the per-connection PDU read and the admission policy:

* **Per-PDU deadline.** A PDU whose header began must be complete within ``dicom.pdu_read_seconds``, however
  slowly its bytes trickle in; otherwise the connection gets an A-ABORT and is closed.
* **Declared-length cap.** An A-ASSOCIATE-RQ may declare at most :data:`MAX_ASSOCIATE_RQ_BYTES`; a P-DATA-TF at
  most the maximum PDU length we negotiated (``dicom.maximum_pdu_size``, or ``dicom.max_pdu_bytes`` when that is
  0 = unlimited); the fixed-size PDUs at most :data:`MAX_SMALL_PDU_BYTES`. Anything larger is refused before a
  byte of its body is read.
* **A reply for every malformed request.** An A-ASSOCIATE-RQ that does not decode or carries an even, zero or
  repeated presentation context ID gets an A-ASSOCIATE-RJ (permanent, service-user, no reason given); any other
  malformed, unknown or oversized PDU gets an A-ABORT (service-provider, with the matching reason).
* **Slots only for associations.** A connection counts against ``dicom.max_associations`` only once its
  A-ASSOCIATE-RQ arrived; connections still waiting for one (at most ``dicom.acse_timeout_seconds``) are bounded
  by ``dicom.max_pending_connections``, the oldest evicted first, and every peer IP by
  ``dicom.max_connections_per_peer``.
* **Over a limit: A-ASSOCIATE-RJ, not a dropped connection.** An A-ASSOCIATE-RQ beyond ``dicom.max_associations``,
  or on a connection beyond its peer's ``dicom.max_connections_per_peer``, is answered with an A-ASSOCIATE-RJ
  (rejected-transient, service-provider presentation related, "local limit exceeded"), written to the socket
  before it is closed, so the sender knows to retry later. A connection beyond the per-peer limit is admitted
  for that answer only (it holds no slot); only when the pending connections are full as well is it closed at
  once.
* **Quiet logs.** The first malformation of a connection is logged at WARNING (peer address and reason, no
  dataset content), the rest at DEBUG; pynetdicom's own ERROR tracebacks for bad PDUs are demoted the same way.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.transport import RequestHandler

from lesiontrack.config.logging import printable
from lesiontrack.config.settings import DicomNodeSettings
from lesiontrack.dicom_node.inbound.assoc_log import filter_pynetdicom_loggers

log = logging.getLogger(__name__)

#: a peer's socket address: (host, port), or (host, port, flowinfo, scope id) over IPv6
PeerAddress = tuple[str | int, ...]

MAX_ASSOCIATE_RQ_BYTES = 1 << 20  # presentation contexts for every storage class plus user identity: ~60 kB
MAX_SMALL_PDU_BYTES = 1024  # A-ASSOCIATE-RJ / A-RELEASE-RQ/RP / A-ABORT are 4 bytes long; A-ASSOCIATE-AC small
_PDU_TYPES = range(0x01, 0x08)

# A-ABORT provider reasons (PS3.8 9.3.8)
REASON_NOT_SPECIFIED = 0x00
REASON_UNRECOGNISED_PDU = 0x01
REASON_UNEXPECTED_PDU = 0x02
REASON_INVALID_PARAMETER = 0x06


@dataclass(frozen=True)
class AssociationPolicy:
    """The limits in force; built from ``dicom.*`` settings."""

    acse_timeout: float = 10.0
    dimse_timeout: float = 30.0
    network_timeout: float = 60.0
    pdu_read_seconds: float = 60.0
    max_associations: int = 10
    max_connections_per_peer: int = 8
    max_pending_connections: int = 20
    max_pdu_bytes: int = 64 * 1024 * 1024

    @classmethod
    def from_settings(cls, cfg: DicomNodeSettings) -> AssociationPolicy:
        negotiated = int(cfg.maximum_pdu_size)
        return cls(
            acse_timeout=float(cfg.acse_timeout_seconds),
            dimse_timeout=float(cfg.dimse_timeout_seconds),
            network_timeout=float(cfg.network_timeout_seconds),
            pdu_read_seconds=float(cfg.pdu_read_seconds),
            max_associations=int(cfg.max_associations),
            max_connections_per_peer=int(cfg.max_connections_per_peer),
            max_pending_connections=int(cfg.max_pending_connections),
            max_pdu_bytes=negotiated if negotiated > 0 else int(cfg.max_pdu_bytes),
        )


@dataclass
class _Conn:
    ip: str
    opened: float
    assoc: Association | None = None
    requested: bool = False  # its A-ASSOCIATE-RQ arrived: it holds an association slot
    warned: bool = False
    closed: bool = False
    over_peer_limit: bool = False  # admitted only to be answered with an A-ASSOCIATE-RJ
    malformed: list[str] = field(default_factory=list)

    def gone(self) -> bool:
        """Refused by the guard, or its association thread has ended."""
        a = self.assoc
        return self.closed or (a is not None and a.ident is not None and not a.is_alive())


class SlotCounter(Protocol):
    """Association slots shared by several receiver processes (:class:`dicom_node.inbound.receivers.SharedSlots`)."""

    def acquire(self, limit: int) -> bool: ...

    def release(self) -> None: ...

    def acquire_peer(self, ip: str, limit: int) -> bool: ...

    def release_peer(self, ip: str) -> None: ...


class ConnectionTable:
    """Live TCP connections of one server, keyed by the peer's (ip, port); thread-safe. With ``shared`` the
    ``max_associations`` and per-peer limits are counted across every receiver process (the pending-connection
    limit stays per process: it protects this process's threads)."""

    def __init__(self, policy: AssociationPolicy, shared: SlotCounter | None = None) -> None:
        self.policy = policy
        self.shared = shared
        self._conns: dict[PeerAddress, _Conn] = {}
        self._lock = threading.Lock()

    def admit(self, address: PeerAddress) -> bool:
        """A new connection: admitted (over the per-peer limit only to be rejected once its A-ASSOCIATE-RQ
        arrives); evicts the oldest idle one over the pending limit; False (close at once) when it is over the
        per-peer limit and the pending connections are full."""
        ip = str(address[0])
        victim: _Conn | None = None
        with self._lock:
            self._prune()
            per_peer = sum(1 for c in self._conns.values() if c.ip == ip and not c.over_peer_limit)
            limit = self.policy.max_connections_per_peer
            over = bool(limit and per_peer >= limit)
            if not over and self.shared is not None and not self.shared.acquire_peer(ip, limit):
                over = True
            pending = [c for c in self._conns.values() if not c.requested]
            if len(pending) >= self.policy.max_pending_connections:
                if over:
                    log.warning("refused connection from %s: over dicom.max_connections_per_peer (%d) and "
                                "dicom.max_pending_connections full", ip, limit)  # fmt: skip
                    return False
                # connections only waiting for their rejection go first, then the oldest
                victim = min(pending, key=lambda c: (not c.over_peer_limit, c.opened))
                self._forget(victim)
            self._conns[tuple(address)] = _Conn(ip, time.monotonic(), over_peer_limit=over)
        if victim is not None:
            log.warning("closing idle connection from %s to admit a new one (dicom.max_pending_connections)", victim.ip)
            _close(victim.assoc)
        return True

    def attach(self, address: PeerAddress, assoc: Association) -> _Conn:
        with self._lock:
            conn = self._conns.get(tuple(address))
            if conn is None:  # evicted between admit and attach
                conn = _Conn(str(address[0]), time.monotonic())
                conn.malformed.append("evicted")
            conn.assoc = assoc
            return conn

    def _prune(self) -> None:
        for k in [k for k, c in self._conns.items() if c.gone()]:
            self._drop(k)

    def _drop(self, key: PeerAddress) -> None:
        conn = self._conns.pop(key)
        if self.shared is not None:
            if not conn.over_peer_limit:
                self.shared.release_peer(conn.ip)
            if conn.requested:
                self.shared.release()

    def _forget(self, conn: _Conn) -> None:
        for k, v in list(self._conns.items()):
            if v is conn:
                self._drop(k)

    def request_slot(self, assoc: Association) -> str | None:
        """The connection's A-ASSOCIATE-RQ arrived: None when it may associate (it then holds a slot), else
        which limit refuses it."""
        with self._lock:
            self._prune()
            conn = next((c for c in self._conns.values() if c.assoc is assoc), None)
            if conn is None:
                return "connection not admitted"
            if conn.over_peer_limit:
                limit = self.policy.max_connections_per_peer
                return f"{limit} connections from this peer (dicom.max_connections_per_peer)"
            full = f"{self.policy.max_associations} associations in progress (dicom.max_associations)"
            if self.shared is not None:
                if not self.shared.acquire(self.policy.max_associations):
                    return full
            elif sum(1 for c in self._conns.values() if c.requested) >= self.policy.max_associations:
                return full
            conn.requested = True
            return None

    def release(self, assoc: Association) -> None:
        with self._lock:
            for k, v in list(self._conns.items()):
                if v.assoc is assoc:
                    self._drop(k)

    def counts(self) -> dict[str, int]:
        with self._lock:
            self._prune()
            held = sum(1 for c in self._conns.values() if c.requested)
            return {"associations": held, "pending": len(self._conns) - held}


def _close(assoc: Association | None) -> None:
    """Close an association's transport from outside its threads (the DUL then sees Evt17 and ends it)."""
    if assoc is None:
        return
    sock = getattr(getattr(assoc, "dul", None), "socket", None)
    raw = getattr(sock, "socket", None)
    if raw is not None:
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)


class _Timeout(Exception):
    pass


class PduGuard:
    """Replaces ``DULServiceProvider._read_pdu_data`` of one acceptor association (see module docstring)."""

    def __init__(
        self, assoc: Association, conn: _Conn, policy: AssociationPolicy, table: ConnectionTable | None = None
    ) -> None:
        self.assoc = assoc
        self.dul = assoc.dul
        self.conn = conn
        self.policy = policy
        self.table = table

    # -- helpers --------------------------------------------------------------------------------------------------
    def _recv_exact(self, raw: socket.socket, n: int, deadline: float) -> bytearray:
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Timeout()
            raw.settimeout(min(left, self.policy.network_timeout))
            try:
                chunk = raw.recv(min(n - len(buf), 1 << 16))
            except TimeoutError:
                raise _Timeout() from None
            if not chunk:
                return buf
            buf.extend(chunk)
        return buf

    def malformed(self, reason: str) -> None:
        self.conn.malformed.append(reason)
        if not self.conn.warned:
            self.conn.warned = True
            log.warning("malformed request from %s: %s; connection refused", self.conn.ip, reason)
        else:
            log.debug("malformed request from %s: %s", self.conn.ip, reason)

    def _refuse(self, reason: str, pdu: A_ASSOCIATE_RJ | A_ABORT_RQ, malformed: bool = True) -> None:
        """Log once, send ``pdu`` (A-ASSOCIATE-RJ or A-ABORT), close the connection, end the association."""
        if malformed:
            self.malformed(reason)
        self.conn.closed = True
        sock = self.dul.socket
        raw = getattr(sock, "socket", None)
        if raw is not None:
            try:
                raw.settimeout(2.0)
                raw.sendall(pdu.encode())
            except OSError:
                pass
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        if sock is None:
            self.dul.event_queue.put("Evt17")
            return
        try:
            sock.close()  # puts Evt17: the state machine ends the association
        except Exception:
            self.dul.event_queue.put("Evt17")

    def _abort(self, reason: str, provider_reason: int) -> None:
        pdu = A_ABORT_RQ()
        pdu.source = 0x02
        pdu.reason_diagnostic = provider_reason
        self._refuse(reason, pdu)

    def _reject(self, reason: str) -> None:
        pdu = A_ASSOCIATE_RJ()
        pdu.result, pdu.source, pdu.reason_diagnostic = 0x01, 0x01, 0x01
        self._refuse(reason, pdu)

    def _reject_over_limit(self, rq: A_ASSOCIATE_RQ, why: str) -> None:
        """A-ASSOCIATE-RJ rejected-transient, service-provider (presentation), local-limit-exceeded (PS3.8
        9.3.4): the sender may retry later. Written before the connection closes (not through the state
        machine, whose thread could lose the race with the close)."""
        pdu = A_ASSOCIATE_RJ()
        pdu.result, pdu.source, pdu.reason_diagnostic = 0x02, 0x03, 0x02
        log.warning(
            "rejected association from %s (calling AE %s): %s; answered A-ASSOCIATE-RJ (transient, local limit "
            "exceeded)",
            self.conn.ip,
            printable(rq.calling_ae_title),
            why,
        )
        self._refuse(why, pdu, malformed=False)

    def _cap(self, pdu_type: int) -> int:
        if pdu_type == 0x01:
            return MAX_ASSOCIATE_RQ_BYTES
        if pdu_type == 0x04:
            return self.policy.max_pdu_bytes
        return MAX_SMALL_PDU_BYTES

    def protect_state_machine(self) -> None:
        """A PDU that decodes but whose content pynetdicom cannot process (e.g. a DIMSE command without a
        CommandField) raises inside the state machine and kills the DUL thread; answer it with an A-ABORT."""
        fsm = self.dul.state_machine
        original = fsm.do_action

        def do_action(event: str) -> None:
            try:
                original(event)
            except Exception as exc:
                if self.conn.closed:
                    return
                self._abort(
                    f"message pynetdicom cannot process ({type(exc).__name__}: {exc})"[:200], REASON_UNEXPECTED_PDU
                )

        fsm.do_action = do_action  # type: ignore[method-assign]  # wrapped for this association only

    # -- the read ---------------------------------------------------------------------------------------------
    def read_pdu(self) -> None:
        sock = self.dul.socket
        raw = getattr(sock, "socket", None)
        if raw is None:
            self.dul.event_queue.put("Evt17")
            return
        read = self._read_bounded(raw)
        if read is None:
            return
        pdu_type, data = read
        try:
            pdu, event = self.dul._decode_pdu(data)
        except Exception as exc:
            self._turn_away(pdu_type, f"PDU type 0x{pdu_type:02X} does not decode ({type(exc).__name__})")
            return
        if isinstance(pdu, A_ASSOCIATE_RQ) and not self._admit(pdu):
            return
        self.dul.event_queue.put(event)
        self.dul._recv_pdu.put(pdu)

    def _read_bounded(self, raw: socket.socket) -> tuple[int, bytearray] | None:
        """One whole PDU (its type and bytes) read within the policy's time and size limits; None when the
        read ended otherwise (the peer closed, or the association was rejected or aborted)."""
        deadline = time.monotonic() + self.policy.pdu_read_seconds
        try:
            header = self._recv_exact(raw, 6, deadline)
            if len(header) < 6:
                self.dul.event_queue.put("Evt17")  # peer closed the connection
                return None
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type not in _PDU_TYPES:
                self._abort(f"unknown PDU type 0x{pdu_type:02X}", REASON_UNRECOGNISED_PDU)
                return None
            cap = self._cap(pdu_type)
            if length > cap:
                self._turn_away(pdu_type, f"PDU type 0x{pdu_type:02X} declares {length} bytes (limit {cap})")
                return None
            body = self._recv_exact(raw, length, deadline)
        except _Timeout:
            self._abort(f"PDU not received within {self.policy.pdu_read_seconds:g} s", REASON_NOT_SPECIFIED)
            return None
        except OSError:
            self.dul.event_queue.put("Evt17")
            return None
        finally:
            with contextlib.suppress(OSError):
                raw.settimeout(self.policy.network_timeout)
        if len(body) < length:
            self.dul.event_queue.put("Evt17")  # peer closed mid-PDU
            return None
        return pdu_type, header + body

    def _turn_away(self, pdu_type: int, why: str) -> None:
        """An association request is rejected; any other PDU aborts the association."""
        if pdu_type == 0x01 and not self.assoc.is_established:
            self._reject(why)
        else:
            self._abort(why, REASON_INVALID_PARAMETER)

    def _admit(self, pdu: A_ASSOCIATE_RQ) -> bool:
        """Whether a well-formed association request goes on to pynetdicom (under the connection limits)."""
        problem = _associate_rq_problem(pdu)
        if problem:
            self._reject(problem)
            return False
        if self.table is not None and not self.assoc.is_established:
            over = self.table.request_slot(self.assoc)
            if over is not None:
                self._reject_over_limit(pdu, over)
                return False
        return True


def _associate_rq_problem(pdu: A_ASSOCIATE_RQ) -> str | None:
    seen: set[int] = set()
    contexts = pdu.presentation_context
    if not contexts:
        return "A-ASSOCIATE-RQ without presentation contexts"
    for cx in contexts:
        cid = cx.context_id
        if cid is None or cid % 2 == 0 or not 1 <= cid <= 255:
            return f"A-ASSOCIATE-RQ with invalid presentation context ID {cid}"
        if cid in seen:
            return f"A-ASSOCIATE-RQ repeats presentation context ID {cid}"
        seen.add(cid)
        if not cx.abstract_syntax or not cx.transfer_syntax:
            return f"A-ASSOCIATE-RQ presentation context {cid} without abstract or transfer syntax"
    return None


def make_request_handler(table: ConnectionTable, policy: AssociationPolicy) -> type[RequestHandler]:
    """A pynetdicom request handler whose associations read PDUs through :class:`PduGuard`."""

    class GuardedRequestHandler(RequestHandler):
        def _create_association(self) -> Association:
            assoc = super()._create_association()
            conn = table.attach(self.client_address, assoc)
            guard = PduGuard(assoc, conn, policy, table)
            assoc.dul._read_pdu_data = guard.read_pdu  # type: ignore[method-assign]  # shadows the method
            guard.protect_state_machine()
            assoc.bind(evt.EVT_CONN_CLOSE, _on_conn_close, [table])
            if conn.malformed == ["evicted"]:
                _close(assoc)
            return assoc

    return GuardedRequestHandler


def _on_conn_close(event: evt.Event, table: ConnectionTable) -> None:
    table.release(event.assoc)


class PynetdicomNoiseFilter(logging.Filter):
    """Demote pynetdicom's ERROR records (and their tracebacks) about bad peers: first per thread at WARNING."""

    def __init__(self) -> None:
        super().__init__()
        self._thread = threading.local()  # per association thread; a new thread that reuses an ident starts afresh

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        record.exc_info = None
        record.exc_text = None
        if getattr(self._thread, "reported", False):
            return False
        self._thread.reported = True
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_filter_installed = False


def install_log_filter() -> None:
    global _filter_installed
    if _filter_installed:
        return
    _filter_installed = True
    filter_pynetdicom_loggers(PynetdicomNoiseFilter())
