"""Turn one received C-STORE (file meta + raw dataset bytes) into a file on disk and rows in the database.

Used by the Storage SCP and by C-GET / DICOMweb retrieval. Returns a DIMSE status. Success once the instance is
durably in the store (temporary file, fsync when ``dicom.fsync``, linked under its final name); its database row
follows in the background indexer (:mod:`dicom_node.inbound.indexer`), whose recovery scan indexes any stored file a
crash left without a row (issue 18).
"""

from __future__ import annotations

import functools
import logging
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.db.repository import audit
from lesiontrack.db.session import session_scope
from lesiontrack.dicom_node.inbound.door import CONTENT_TAGS, Refusal, check_content
from lesiontrack.dicom_node.inbound.indexer import make_indexer
from lesiontrack.dicom_node.inbound.sink import IndexItem, IndexSink, WaitingIndexSink
from lesiontrack.dicom_node.inbound.storage import (
    EXPLICIT_VR_BE,
    NATIVE_TS,
    InstanceStore,
    InvalidDataset,
    StorageFull,
    check_structure,
    uid_problem,
)

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

_HEADER_TAGS = [
    "PatientID",
    "IssuerOfPatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "FrameOfReferenceUID",
    "InstanceNumber",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
]


@dataclass
class IngestResult:
    status: int
    comment: str = ""
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    path: Path | None = None
    duplicate: bool = False  # identical bytes were already stored
    reopened: bool = False  # the series had been complete and is receiving again

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


_TAGS = {
    "SpecificCharacterSet": 0x00080005,
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "StudyDate": 0x00080020,
    "StudyTime": 0x00080030,
    "AccessionNumber": 0x00080050,
    "Modality": 0x00080060,
    "SeriesDescription": 0x0008103E,
    "PatientID": 0x00100020,
    "IssuerOfPatientID": 0x00100021,
    "BodyPartExamined": 0x00180015,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "SeriesNumber": 0x00200011,
    "InstanceNumber": 0x00200013,
    "FrameOfReferenceUID": 0x00200052,
}
_TEXT = {"SeriesDescription", "PatientID", "IssuerOfPatientID", "AccessionNumber"}


def _convert(specific_character_set: bytes) -> tuple[str, ...]:
    cs = specific_character_set.decode("ascii", "replace").strip(" \x00")
    return tuple(convert_encodings([c.strip() for c in cs.split("\\")] if cs else ["ISO_IR 6"]))


_convert_cached = functools.lru_cache(maxsize=64)(_convert)


def _encodings(specific_character_set: bytes) -> tuple[str, ...]:
    """Python codecs for a raw Specific Character Set value; remembered for short values (a series sends the same
    value with every instance; a long one from a faulty peer is not kept)."""
    if len(specific_character_set) <= 256:
        return _convert_cached(specific_character_set)
    return _convert(specific_character_set)


class Header:
    """The few header values ingest needs, read from raw element bytes during the structure walk; ``raw`` and
    ``present`` (every top-level tag's VR and length) as the walk left them, for the door's content check."""

    def __init__(self, raw: dict[int, bytes], present: dict[int, tuple[bytes, int]] | None = None) -> None:
        self.raw = raw
        self.present: dict[int, tuple[bytes, int]] = present if present is not None else {}
        encodings = _encodings(raw.get(_TAGS["SpecificCharacterSet"], b""))
        self._values: dict[str, str] = {}
        for name, tag in _TAGS.items():
            v = raw.get(tag, b"")
            if not v:
                continue
            text = decode_bytes(v, encodings, set()) if name in _TEXT else v.decode("latin-1")
            text = text.strip(" \x00")
            if text:
                self._values[name] = text

    def get(self, name: str, default: object = None) -> object:
        return self._values.get(name, default)

    def __getattr__(self, name: str) -> str:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None


_COLLECT = (*_TAGS.values(), *CONTENT_TAGS)


def parse_header(meta_bytes: bytes, data: bytes, transfer_syntax: str) -> Header | Dataset:
    """Validate the structure (every element, every binary value's length) and read the ingest header and the
    values the door's content check needs (own walker, no pydicom decode)."""
    raw = dict.fromkeys(_COLLECT, b"")
    present: dict[int, tuple[bytes, int]] = {}
    if check_structure(data, transfer_syntax, raw, present):
        return Header(raw, present)
    return dcmread(BytesIO(meta_bytes + data), stop_before_pixels=True, specific_tags=_HEADER_TAGS)


def content_refusal(ds: Header | Dataset, sop_class: str, transfer_syntax: str) -> Refusal | None:
    """The door's content check (:mod:`dicom_node.inbound.door`) of a walked dataset."""
    if not isinstance(ds, Header):
        return None
    return check_content(
        sop_class,
        ds.raw,
        ds.present,
        little=transfer_syntax != EXPLICIT_VR_BE,
        native=transfer_syntax in NATIVE_TS,
        transfer_syntax=transfer_syntax,
    )


class RequestMeta:
    """The file meta of a C-STORE as three strings (what the network thread has, without building a pydicom
    FileMetaDataset); reads like one for ``get``."""

    __slots__ = ("_values",)

    def __init__(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> None:
        self._values = {
            "MediaStorageSOPClassUID": sop_class_uid,
            "MediaStorageSOPInstanceUID": sop_instance_uid,
            "TransferSyntaxUID": transfer_syntax_uid,
        }

    def get(self, name: str, default: object = None) -> object:
        return self._values.get(name, default)


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    if vr == b"OB":
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def encode_request_meta(meta: RequestMeta) -> bytes:
    """Preamble, "DICM" and the file meta group, byte for byte what pydicom writes for pynetdicom's
    ``event.file_meta`` (tests/test_dicom_node_scp.py checks), in a few microseconds."""
    v = meta._values
    body = b"".join(
        (
            _element(2, 0x0001, b"OB", b"\x00\x01"),
            _element(2, 0x0002, b"UI", v["MediaStorageSOPClassUID"].encode("ascii")),
            _element(2, 0x0003, b"UI", v["MediaStorageSOPInstanceUID"].encode("ascii")),
            _element(2, 0x0010, b"UI", v["TransferSyntaxUID"].encode("ascii")),
            _element(2, 0x0012, b"UI", str(PYNETDICOM_IMPLEMENTATION_UID).encode("ascii")),
            _element(2, 0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")),
        )
    )
    return b"\x00" * 128 + b"DICM" + _element(2, 0x0000, b"UL", struct.pack("<I", len(body))) + body


def encode_meta(meta: FileMetaDataset | RequestMeta) -> bytes:
    if isinstance(meta, RequestMeta):
        return encode_request_meta(meta)
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()


def _s(ds: Dataset | Header, name: str, maxlen: int) -> str | None:
    v = ds.get(name)
    if v is None or v == "":
        return None
    return str(v)[:maxlen]


def _uid(ds: Dataset | Header, name: str) -> str | None:
    """A UID as sent (never cut: a UID longer than 64 characters is refused, not truncated)."""
    v = ds.get(name)
    return None if v is None or v == "" else str(v)


def _i(ds: Dataset | Header, name: str) -> int | None:
    try:
        v = ds.get(name)
        if v is None or v == "":
            return None
        return int(v) if isinstance(v, int | float) else int(str(v))
    except (TypeError, ValueError):
        return None


class Ingestor:
    """Validates, stores and (in the background) indexes received instances. Thread-safe: one call per C-STORE.

    :meth:`receive` is the network thread's path: door validation, the durable write, Success; the rows follow
    through ``sink`` (:class:`dicom_node.inbound.sink.IndexSink`): this process's
    :class:`dicom_node.inbound.indexer.Indexer`
    (the default), or in a receiver process its journal, which the service process reads. :meth:`ingest` also
    waits for the row (retrievals, tests), so it needs a sink that can wait.
    """

    def __init__(
        self,
        store: InstanceStore,
        session_factory: sessionmaker[Session],
        actor: str = "dicom-node",
        sink: IndexSink | None = None,
    ):
        self.store = store
        self.session_factory = session_factory
        self.actor = actor
        #: where the rows go: given by the composition site, or this process's own indexer
        self.sink: IndexSink = sink if sink is not None else make_indexer(store, session_factory, actor)

    def close(self) -> None:
        self.sink.close()

    def ingest(
        self,
        meta: FileMetaDataset | RequestMeta,
        dataset_bytes: bytes,
        calling_ae: str | None = None,
        peer: str | None = None,
        association: str | None = None,
    ) -> IngestResult:
        """Store one instance and wait for its database row (a sink that commits in this process, never the
        journal)."""
        sink = self.sink
        if not isinstance(sink, WaitingIndexSink):
            raise RuntimeError("an ingestor that journals for the service process cannot wait for rows")
        result, item = self._receive(meta, dataset_bytes, calling_ae, peer, association)
        if item is not None:
            sink.flush()  # commits at once (no gathering window while someone waits)
            if item.error:
                return IngestResult(
                    OUT_OF_RESOURCES, "database failure", series_uid=result.series_uid,
                    sop_instance_uid=result.sop_instance_uid, path=result.path,
                )  # fmt: skip
        return result

    def receive(
        self,
        meta: FileMetaDataset | RequestMeta,
        dataset_bytes: bytes,
        calling_ae: str | None = None,
        peer: str | None = None,
        association: str | None = None,
    ) -> IngestResult:
        """Store one instance durably and queue its row; ``association`` (a UUID per association) lets an
        abort mark what it delivered."""
        return self._receive(meta, dataset_bytes, calling_ae, peer, association)[0]

    def _receive(
        self,
        meta: FileMetaDataset | RequestMeta,
        dataset_bytes: bytes,
        calling_ae: str | None,
        peer: str | None,
        association: str | None,
    ) -> tuple[IngestResult, IndexItem | None]:
        result, item = self._store(meta, dataset_bytes, calling_ae, peer, association)
        if result.status in (DATASET_MISMATCH, CANNOT_UNDERSTAND):
            self._audit_refusal(result, meta, calling_ae, peer)
        if item is not None:
            self.sink.submit(item)
        return result, item

    def _audit_refusal(
        self, result: IngestResult, meta: FileMetaDataset | RequestMeta, calling_ae: str | None, peer: str | None
    ) -> None:
        """One audit row per refused C-STORE (the UIDs as sent, cut to the column width; never PHI)."""
        try:
            with session_scope(self.session_factory) as s:
                audit(
                    s,
                    self.actor,
                    "instance.refused",
                    "instance",
                    (result.sop_instance_uid or "")[:128] or None,
                    status=f"0x{result.status:04X}",
                    reason=result.comment,
                    sop_class_uid=str(meta.get("MediaStorageSOPClassUID", ""))[:128],
                    transfer_syntax_uid=str(meta.get("TransferSyntaxUID", ""))[:128],
                    calling_ae=calling_ae,
                    peer=peer,
                )
        except SQLAlchemyError as exc:
            log.error("cannot record the refusal of %s in the audit log: %s", result.sop_instance_uid, exc)

    def _store(
        self,
        meta: FileMetaDataset | RequestMeta,
        dataset_bytes: bytes,
        calling_ae: str | None,
        peer: str | None,
        association: str | None,
    ) -> tuple[IngestResult, IndexItem | None]:
        ts = str(meta.get("TransferSyntaxUID", ""))
        req_sop = str(meta.get("MediaStorageSOPInstanceUID", ""))
        req_class = str(meta.get("MediaStorageSOPClassUID", ""))
        for name, uid in (("request SOP Instance UID", req_sop), ("request SOP Class UID", req_class)):
            problem = uid_problem(name, uid)
            if problem:
                log.warning("rejected C-STORE from %s: %s", calling_ae, problem)
                return IngestResult(DATASET_MISMATCH, problem[:64], sop_instance_uid=req_sop), None
        try:
            meta_bytes = encode_meta(meta)
            ds = parse_header(meta_bytes, dataset_bytes, ts)
        except Exception as exc:
            log.warning("rejected C-STORE of %s from %s: not a valid dataset: %s", req_sop, calling_ae, exc)
            return (
                IngestResult(CANNOT_UNDERSTAND, f"not a valid DICOM dataset: {exc}"[:64], sop_instance_uid=req_sop),
                None,
            )
        sop_uid = _uid(ds, "SOPInstanceUID")
        study_uid = _uid(ds, "StudyInstanceUID")
        series_uid = _uid(ds, "SeriesInstanceUID")
        sop_class = _uid(ds, "SOPClassUID")
        mismatch = _identity_mismatch((sop_class, sop_uid, study_uid, series_uid), req_sop, req_class, calling_ae)
        if mismatch is not None:
            return IngestResult(DATASET_MISMATCH, mismatch, sop_instance_uid=req_sop), None
        if not (sop_uid and study_uid and series_uid):  # the check above answered already; keeps the types narrow
            return IngestResult(DATASET_MISMATCH, "missing UIDs", sop_instance_uid=req_sop), None
        refusal = content_refusal(ds, req_class, ts)
        if refusal is not None:
            log.warning("rejected C-STORE of %s from %s: %s", req_sop, calling_ae, refusal.reason)
            return IngestResult(refusal.status, refusal.reason[:64], sop_instance_uid=req_sop), None
        try:
            put = self.store.put(study_uid, series_uid, sop_uid, meta_bytes, dataset_bytes)
        except StorageFull as exc:
            log.error("disk full storing %s: %s", sop_uid, exc)
            return (
                IngestResult(OUT_OF_RESOURCES, "disk full", series_uid=series_uid, sop_instance_uid=sop_uid),
                None,
            )
        except OSError as exc:
            log.error("cannot store %s: %s", sop_uid, exc)
            return (
                IngestResult(
                    OUT_OF_RESOURCES, f"write failed: {exc.strerror}"[:64], series_uid=series_uid,
                    sop_instance_uid=sop_uid,
                ),
                None,
            )  # fmt: skip
        item = IndexItem(
            path=put.path,
            header=header_values(ds),
            sop_class_uid=req_class,
            transfer_syntax_uid=ts,
            size=len(meta_bytes) + len(dataset_bytes),
            received_at=datetime.now(UTC),
            association_uid=association,
            calling_ae=calling_ae,
            peer=peer,
            data=dataset_bytes,  # a journal line leaves it out
        )
        result = IngestResult(
            SUCCESS, series_uid=series_uid, sop_instance_uid=sop_uid, path=put.path, duplicate=not put.created
        )
        return result, item


def _identity_mismatch(
    uids: tuple[str | None, str | None, str | None, str | None], req_sop: str, req_class: str, calling_ae: str | None
) -> str | None:
    """Why the dataset's (SOP Class, SOP Instance, Study, Series) UIDs refuse the C-STORE (invalid, or not the
    request's), or None."""
    sop_class, sop_uid, study_uid, series_uid = uids
    problems = [
        p
        for p in (
            uid_problem("SOPClassUID", sop_class),
            uid_problem("SOPInstanceUID", sop_uid),
            uid_problem("StudyInstanceUID", study_uid),
            uid_problem("SeriesInstanceUID", series_uid),
        )
        if p
    ]
    if problems:
        log.warning("rejected C-STORE of %s from %s: %s", req_sop, calling_ae, "; ".join(problems))
        return "; ".join(problems)[:64]
    if sop_uid != req_sop:
        return "SOPInstanceUID differs from the request"
    if sop_class != req_class:
        log.warning("rejected C-STORE of %s from %s: SOP Class %s, request says %s", req_sop, calling_ae,
                    sop_class, req_class)  # fmt: skip
        return "SOPClassUID differs from the request"
    return None


def header_values(ds: Dataset | Header) -> dict[str, str]:
    """The ingest header values as text (what :class:`dicom_node.inbound.sink.IndexItem` carries)."""
    if isinstance(ds, Header):
        return dict(ds._values)
    out = {}
    for name in _TAGS:
        v = ds.get(name)
        if v is not None and str(v).strip():
            out[name] = str(v).strip()
    return out


def item_from_file(path: Path) -> IndexItem:
    """An :class:`IndexItem` for a stored file found without a row (the recovery scan)."""
    raw = path.read_bytes()
    fp = BytesIO(raw)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    ts = str(meta.get("TransferSyntaxUID", ""))
    ds = parse_header(raw[: fp.tell()], raw[fp.tell() :], ts)
    values = header_values(ds)
    for name in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not values.get(name):
            raise InvalidDataset(f"{name} missing")
    return IndexItem(
        path=path,
        header=values,
        sop_class_uid=str(meta.get("MediaStorageSOPClassUID", "")),
        transfer_syntax_uid=ts,
        size=len(raw),
        received_at=datetime.fromtimestamp(path.stat().st_mtime, UTC),
        recovered=True,
    )


def ingest_part10(ingestor: Ingestor, raw: bytes, calling_ae: str | None = None) -> IngestResult:
    """Ingest a DICOM Part 10 byte string (C-GET/DICOMweb retrieval, tests): its meta re-used, dataset verbatim."""
    fp = BytesIO(raw)
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    except Exception as exc:
        return IngestResult(CANNOT_UNDERSTAND, f"not a DICOM Part 10 file: {exc}"[:64])
    return ingestor.ingest(meta, raw[fp.tell() :], calling_ae=calling_ae)


def ingest_file(ingestor: Ingestor, path: Path, calling_ae: str | None = None) -> IngestResult:
    return ingest_part10(ingestor, Path(path).read_bytes(), calling_ae)
