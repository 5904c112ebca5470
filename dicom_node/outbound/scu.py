"""Outgoing DIMSE: C-ECHO, C-FIND (Study Root), C-MOVE, C-GET and C-STORE towards configured PACS peers.

Files are sent as their stored bytes (pynetdicom's chunked send: no decode, no re-encode).

A failure of our own request (a destination down, an association refused) is reported once by its caller, as one
line per attempt (:mod:`dicom_node.outbound.sending`: WARNING while retries remain, ERROR once a person must act);
pynetdicom's own WARNING/ERROR lines about it, logged on its association threads, are demoted to DEBUG by
:class:`RequestorNoiseFilter`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # sop_class builds its names at import
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from lesiontrack.config.settings import PacsPeer, Settings
from lesiontrack.config.version import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from lesiontrack.dicom_node.inbound.assoc_log import filter_pynetdicom_loggers
from lesiontrack.dicom_node.tls import client_context

log = logging.getLogger(__name__)

_config.STORE_SEND_CHUNKED_DATASET = True  # C-STORE from a path streams the file's bytes as they are

UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]

#: SOP classes we accept on a C-GET association (at most 128 contexts in total may be proposed).
GET_STORAGE_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
]
GET_TRANSFER_SYNTAXES = [
    *UNCOMPRESSED,
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
]


class DimseError(RuntimeError):
    """A DIMSE exchange with a peer failed (no association, or a failure status)."""


@dataclass
class RetrieveResult:
    completed: int = 0
    failed: int = 0
    warning: int = 0
    status: int | None = None
    failed_uids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status in (0x0000, 0xB000) and self.failed == 0


def _ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.dicom.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.acse_timeout = 30
    ae.dimse_timeout = 120
    ae.network_timeout = 120
    ae.maximum_pdu_size = settings.dicom.maximum_pdu_size
    return ae


_requesting = threading.local()


def _in_our_request() -> bool:
    """Whether this thread works for one of our requests: inside :func:`associate`, or a pynetdicom association
    (or its DUL) thread of an association we requested."""
    if getattr(_requesting, "depth", 0):
        return True
    t = threading.current_thread()
    assoc = t if isinstance(t, Association) else getattr(t, "assoc", None) if hasattr(t, "_assoc") else None
    return isinstance(assoc, Association) and bool(assoc.is_requestor)


class RequestorNoiseFilter(logging.Filter):
    """pynetdicom's WARNING/ERROR records about our own requests become DEBUG (the caller reports the failure)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not _in_our_request():
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info, record.exc_text = None, None
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_noise_filter_installed = False


def install_requestor_filter() -> None:
    global _noise_filter_installed
    if _noise_filter_installed:
        return
    _noise_filter_installed = True
    filter_pynetdicom_loggers(RequestorNoiseFilter())


@contextmanager
def associate(settings: Settings, peer: PacsPeer, ae: AE, **kwargs: Any) -> Iterator[Association]:
    install_requestor_filter()
    _requesting.depth = getattr(_requesting, "depth", 0) + 1
    try:
        with _associate(settings, peer, ae, **kwargs) as assoc:
            yield assoc
    finally:
        _requesting.depth -= 1


@contextmanager
def _associate(settings: Settings, peer: PacsPeer, ae: AE, **kwargs: Any) -> Iterator[Association]:
    tls = None
    if peer.tls:
        cx = client_context(settings.dicom.tls)
        tls = (cx, peer.host) if cx else None  # the host name goes out as SNI; trust comes from the CA file
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls, **kwargs)
    if not assoc.is_established:
        raise DimseError(f"no association with {peer.name} ({peer.ae_title}@{peer.host}:{peer.port})")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def echo(settings: Settings, peer: PacsPeer) -> int:
    ae = _ae(settings)
    ae.add_requested_context(Verification)
    with associate(settings, peer, ae) as assoc:
        rsp = assoc.send_c_echo()
        if "Status" not in rsp:
            raise DimseError(f"C-ECHO to {peer.name}: no response")
        return int(rsp.Status)


def find(settings: Settings, peer: PacsPeer, query: Dataset) -> list[Dataset]:
    """Study Root C-FIND; returns the pending identifiers. Raises on a failure status."""
    ae = _ae(settings)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    out: list[Dataset] = []
    with associate(settings, peer, ae) as assoc:
        for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if "Status" not in status:
                raise DimseError(f"C-FIND to {peer.name}: connection lost or timed out")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01) and ident is not None:
                out.append(ident)
            elif code not in (0x0000, 0xFF00, 0xFF01):
                raise DimseError(f"C-FIND to {peer.name} failed with status 0x{code:04X}")
    return out


def _collect(responses: Iterator[tuple[Dataset, Dataset | None]], what: str, peer: PacsPeer) -> RetrieveResult:
    res = RetrieveResult()
    for status, ident in responses:
        if "Status" not in status:
            raise DimseError(f"{what} from {peer.name}: connection lost or timed out")
        code = int(status.Status)
        res.status = code
        res.completed = int(status.get("NumberOfCompletedSuboperations", res.completed) or 0)
        res.failed = int(status.get("NumberOfFailedSuboperations", res.failed) or 0)
        res.warning = int(status.get("NumberOfWarningSuboperations", res.warning) or 0)
        if ident is not None and "FailedSOPInstanceUIDList" in ident:
            v = ident.FailedSOPInstanceUIDList
            res.failed_uids = [str(x) for x in v] if isinstance(v, (list, MultiValue)) else [str(v)]
    return res


def move(settings: Settings, peer: PacsPeer, query: Dataset, destination: str | None = None) -> RetrieveResult:
    """C-MOVE to ``destination`` (default: our own AE title, so our Storage SCP receives the objects)."""
    ae = _ae(settings)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    with associate(settings, peer, ae) as assoc:
        return _collect(
            assoc.send_c_move(
                query, destination or settings.dicom.ae_title, StudyRootQueryRetrieveInformationModelMove
            ),
            "C-MOVE",
            peer,
        )


StoreHandler = Callable[[FileMetaDataset, bytes, str], int]


def get(settings: Settings, peer: PacsPeer, query: Dataset, on_store: StoreHandler) -> RetrieveResult:
    """C-GET: the peer sends the objects back over our association; ``on_store(meta, bytes, calling_ae)`` stores
    each one and returns its DIMSE status."""
    ae = _ae(settings)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for uid in GET_STORAGE_CLASSES:
        ae.add_requested_context(uid, GET_TRANSFER_SYNTAXES)
        roles.append(build_role(uid, scp_role=True))

    def handle(event: evt.Event) -> int:
        return on_store(event.file_meta, event.encoded_dataset(include_meta=False), peer.ae_title)

    with associate(settings, peer, ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, handle)]) as assoc:
        return _collect(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet), "C-GET", peer)


@dataclass
class StoreOutcome:
    path: Path
    status: int | None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and (self.status == 0x0000 or 0xB000 <= self.status <= 0xBFFF)


def store_files(settings: Settings, peer: PacsPeer, files: list[Path]) -> list[StoreOutcome]:
    """C-STORE every file over one association, each in its own transfer syntax (plus uncompressed)."""
    metas = []
    for f in files:
        meta = dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
        metas.append(meta)
    ae = _ae(settings)
    pairs = sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas})
    if len(pairs) > 128:
        raise DimseError(f"too many SOP class / transfer syntax combinations ({len(pairs)}) for one association")
    for sop, ts in pairs:
        ae.add_requested_context(sop, [ts])
    out: list[StoreOutcome] = []
    with associate(settings, peer, ae) as assoc:
        for f in files:
            try:
                rsp = assoc.send_c_store(f)
            except (ValueError, AttributeError, RuntimeError) as exc:
                out.append(StoreOutcome(f, None, str(exc)))
                continue
            if "Status" not in rsp:
                out.append(StoreOutcome(f, None, "no response (connection lost or timed out)"))
                break
            code = int(rsp.Status)
            out.append(
                StoreOutcome(f, code, "" if code == 0 else f"status 0x{code:04X} {rsp.get('ErrorComment', '')}".strip())
            )
    return out
