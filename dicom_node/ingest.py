"""Turn one received C-STORE (file meta + raw dataset bytes) into a file on disk and rows in the database.

Used by the Storage SCP and by C-GET / DICOMweb retrieval. Returns a DIMSE status; Success only once the
file is renamed into place and the database transaction is committed.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db.models import Instance, Series, SeriesState
from db.repository import audit, get_or_create_patient, get_or_create_series, get_or_create_study
from db.session import session_scope
from dicom_node.storage import InstanceStore, StorageFull, check_structure, sha256_hex, uid_problem

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


# statements built once (building them per C-STORE costs more than executing them)
_LOOKUP = select(Instance.id, Instance.sha256, Instance.file_path).where(Instance.sop_instance_uid == bindparam("sop"))
_BUMP_SERIES = (
    update(Series)
    .where(Series.id == bindparam("pk"), Series.state == bindparam("st"))
    .values(instance_count=Series.instance_count + 1, last_received_at=bindparam("now"))
)
_INSERT_INSTANCE = insert(Instance)


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


class Header:
    """The few header values ingest needs, read from raw element bytes during the structure walk."""

    def __init__(self, raw: dict[int, bytes]) -> None:
        from pydicom.charset import convert_encodings, decode_bytes

        cs = raw.get(_TAGS["SpecificCharacterSet"], b"").decode("ascii", "replace").strip(" \x00")
        encodings = convert_encodings([c.strip() for c in cs.split("\\")] if cs else ["ISO_IR 6"])
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


def parse_header(meta_bytes: bytes, data: bytes, transfer_syntax: str) -> Header | Dataset:
    """Validate the structure and read the ingest header (own walker; pydicom only for deflated data)."""
    raw = dict.fromkeys(_TAGS.values(), b"")
    if check_structure(data, transfer_syntax, raw):
        return Header(raw)
    return dcmread(BytesIO(meta_bytes + data), stop_before_pixels=True, specific_tags=_HEADER_TAGS)


def encode_meta(meta: FileMetaDataset) -> bytes:
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
    """Validates, writes and records received instances. Thread-safe: one call per C-STORE."""

    def __init__(self, store: InstanceStore, session_factory: sessionmaker[Session], actor: str = "dicom-node"):
        self.store = store
        self.session_factory = session_factory
        self.actor = actor
        self._lock = threading.Lock()  # serialises hierarchy creation races inside one process
        self._series_pk: dict[str, int] = {}  # series UID -> primary key, for the one-transaction fast path
        self._association = threading.local()  # the association of the C-STORE this thread is recording
        self.engine = session_factory.kw["bind"]
        self._own_engine = False
        if not store.fsync and self.engine.dialect.name == "sqlite":
            # with fsync off for files, do not fsync the SQLite WAL on every commit either (the database stays
            # consistent; a power cut may lose the last commits, exactly like the unsynced files)
            from sqlalchemy import event

            from db.session import make_engine

            self.engine = make_engine(self.engine.url.render_as_string(hide_password=False))
            self._own_engine = True

            @event.listens_for(self.engine, "connect")
            def _normal_sync(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        if self._own_engine:
            self.engine.dispose()

    def ingest(
        self,
        meta: FileMetaDataset,
        dataset_bytes: bytes,
        calling_ae: str | None = None,
        peer: str | None = None,
        association: str | None = None,
    ) -> IngestResult:
        """Store one instance; ``association`` (a UUID per association) lets an abort mark what it delivered."""
        self._association.value = association
        result = self._ingest(meta, dataset_bytes, calling_ae, peer)
        if result.status in (DATASET_MISMATCH, CANNOT_UNDERSTAND):
            self._audit_refusal(result, meta, calling_ae, peer)
        return result

    def _audit_refusal(
        self, result: IngestResult, meta: FileMetaDataset, calling_ae: str | None, peer: str | None
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

    def _ingest(
        self, meta: FileMetaDataset, dataset_bytes: bytes, calling_ae: str | None, peer: str | None
    ) -> IngestResult:
        ts = str(meta.get("TransferSyntaxUID", ""))
        req_sop = str(meta.get("MediaStorageSOPInstanceUID", ""))
        req_class = str(meta.get("MediaStorageSOPClassUID", ""))
        for name, uid in (("request SOP Instance UID", req_sop), ("request SOP Class UID", req_class)):
            problem = uid_problem(name, uid)
            if problem:
                log.warning("rejected C-STORE from %s: %s", calling_ae, problem)
                return IngestResult(DATASET_MISMATCH, problem[:64], sop_instance_uid=req_sop)
        try:
            meta_bytes = encode_meta(meta)
            ds = parse_header(meta_bytes, dataset_bytes, ts)
        except Exception as exc:
            log.warning("rejected C-STORE of %s from %s: not a valid dataset: %s", req_sop, calling_ae, exc)
            return IngestResult(CANNOT_UNDERSTAND, f"not a valid DICOM dataset: {exc}"[:64], sop_instance_uid=req_sop)
        sop_uid = _uid(ds, "SOPInstanceUID")
        study_uid = _uid(ds, "StudyInstanceUID")
        series_uid = _uid(ds, "SeriesInstanceUID")
        sop_class = _uid(ds, "SOPClassUID")
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
            return IngestResult(DATASET_MISMATCH, "; ".join(problems)[:64], sop_instance_uid=req_sop)
        if sop_uid != req_sop:
            return IngestResult(DATASET_MISMATCH, "SOPInstanceUID differs from the request", sop_instance_uid=req_sop)
        if sop_class != req_class:
            log.warning("rejected C-STORE of %s from %s: SOP Class %s, request says %s", req_sop, calling_ae,
                        sop_class, req_class)  # fmt: skip
            return IngestResult(DATASET_MISMATCH, "SOPClassUID differs from the request", sop_instance_uid=req_sop)
        if not (sop_uid and study_uid and series_uid):  # the check above answered already; keeps the types narrow
            return IngestResult(DATASET_MISMATCH, "missing UIDs", sop_instance_uid=req_sop)
        sha = sha256_hex(dataset_bytes)
        return self._store_and_record(
            ds, meta, meta_bytes, dataset_bytes, sha, sop_uid, study_uid, series_uid, calling_ae, peer
        )

    # -- internals ---------------------------------------------------------------------------------------------

    def _store_and_record(
        self,
        ds: Dataset | Header,
        meta: FileMetaDataset,
        meta_bytes: bytes,
        data: bytes,
        sha: str,
        sop_uid: str,
        study_uid: str,
        series_uid: str,
        calling_ae: str | None,
        peer: str | None,
    ) -> IngestResult:
        try:
            with self.engine.connect() as c:
                known = list(c.execute(_LOOKUP, {"sop": sop_uid}))
        except SQLAlchemyError as exc:
            log.error("database failure looking up %s: %s", sop_uid, exc)
            return IngestResult(OUT_OF_RESOURCES, "database failure", series_uid=series_uid, sop_instance_uid=sop_uid)
        same = next((k for k in known if k.sha256 == sha), None)
        if same is not None and Path(same.file_path).is_file():
            log.debug("duplicate C-STORE of %s (identical bytes): success", sop_uid)
            return IngestResult(
                SUCCESS, series_uid=series_uid, sop_instance_uid=sop_uid, path=Path(same.file_path), duplicate=True
            )
        conflict = [k for k in known if k.sha256 != sha]
        path = self.store.path_for(study_uid, series_uid, sop_uid, sha if conflict else None)
        try:
            self.store.write(path, [meta_bytes, data])
        except StorageFull as exc:
            log.error("disk full storing %s: %s", sop_uid, exc)
            return IngestResult(OUT_OF_RESOURCES, "disk full", series_uid=series_uid, sop_instance_uid=sop_uid)
        except OSError as exc:
            log.error("cannot write %s: %s", path, exc)
            return IngestResult(
                OUT_OF_RESOURCES, f"write failed: {exc.strerror}"[:64], series_uid=series_uid, sop_instance_uid=sop_uid
            )
        reopened = False
        error = "database failure"
        size = len(meta_bytes) + len(data)
        if same is None and not conflict and series_uid in self._series_pk:
            try:
                if self._record_fast(self._series_pk[series_uid], ds, meta, path, size, sha, calling_ae):
                    log.debug("stored %s (series %s) from %s", sop_uid, series_uid, calling_ae)
                    return IngestResult(SUCCESS, series_uid=series_uid, sop_instance_uid=sop_uid, path=path)
            except SQLAlchemyError as exc:  # fall through to the full path, which retries and reports
                log.warning("fast record of %s failed (%s); retrying", sop_uid, exc)
        for _attempt in range(4):
            try:
                with self._lock, session_scope(self.session_factory) as s:
                    if same is not None:  # row existed but its file had vanished: file rewritten, row kept
                        row = s.get(Instance, same.id)
                        if row is not None:
                            row.file_path = str(path)
                    else:
                        reopened = self._record(s, ds, meta, path, size, sha, calling_ae, peer, conflict)
                error = ""
                break
            except IntegrityError as exc:
                # another process recorded the same bytes (success) or created the same series (retry)
                error = f"database integrity error: {exc.orig}"
                try:
                    with session_scope(self.session_factory) as s:
                        if (
                            s.scalar(
                                select(Instance.id).where(Instance.sop_instance_uid == sop_uid, Instance.sha256 == sha)
                            )
                            is not None
                        ):
                            return IngestResult(
                                SUCCESS, series_uid=series_uid, sop_instance_uid=sop_uid, path=path, duplicate=True
                            )
                except SQLAlchemyError:
                    pass
            except OperationalError as exc:
                error = f"database failure: {exc.orig}"
                if "locked" not in str(exc).lower():
                    break
            except SQLAlchemyError as exc:
                error = f"database failure: {exc}"
                break
        if error:
            log.error("database failure recording %s: %s", sop_uid, error)
            if same is None:
                path.unlink(missing_ok=True)
            return IngestResult(OUT_OF_RESOURCES, "database failure", series_uid=series_uid, sop_instance_uid=sop_uid)
        log.debug("stored %s (series %s) from %s", sop_uid, series_uid, calling_ae)
        return IngestResult(SUCCESS, series_uid=series_uid, sop_instance_uid=sop_uid, path=path, reopened=reopened)

    def _record_fast(
        self,
        series_pk: int,
        ds: Dataset | Header,
        meta: FileMetaDataset,
        path: Path,
        size: int,
        sha: str,
        calling_ae: str | None,
    ) -> bool:
        """One short Core transaction for the common case (known series still receiving); False = use _record."""
        now = datetime.now(UTC)
        with self.engine.begin() as c:
            n = c.execute(_BUMP_SERIES, {"pk": series_pk, "st": SeriesState.RECEIVING, "now": now}).rowcount
            if n != 1:
                c.rollback()
                return False
            c.execute(
                _INSERT_INSTANCE,
                dict(
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=str(meta.MediaStorageSOPClassUID),
                    series_pk=series_pk,
                    transfer_syntax_uid=str(meta.TransferSyntaxUID),
                    file_path=str(path),
                    size_bytes=size,
                    sha256=sha,
                    instance_number=_i(ds, "InstanceNumber"),
                    sender_ae=(calling_ae or "")[:16] or None,
                    received_at=now,
                    association_uid=getattr(self._association, "value", None),
                    transfer_incomplete=False,
                ),
            )
        return True

    def _record(
        self,
        s: Session,
        ds: Dataset | Header,
        meta: FileMetaDataset,
        path: Path,
        size: int,
        sha: str,
        calling_ae: str | None,
        peer: str | None,
        conflict: list[Instance],
    ) -> bool:
        now = datetime.now(UTC)
        patient = get_or_create_patient(s, _s(ds, "PatientID", 64) or "", _s(ds, "IssuerOfPatientID", 64))
        study = get_or_create_study(
            s,
            patient,
            str(ds.StudyInstanceUID),
            study_date=_s(ds, "StudyDate", 8),
            study_time=_s(ds, "StudyTime", 16),
            accession_number=_s(ds, "AccessionNumber", 16),
        )
        series = get_or_create_series(
            s,
            study,
            str(ds.SeriesInstanceUID),
            modality=_s(ds, "Modality", 16),
            series_number=_i(ds, "SeriesNumber"),
            series_description=_s(ds, "SeriesDescription", 64),
            body_part=_s(ds, "BodyPartExamined", 16),
            frame_of_reference_uid=_s(ds, "FrameOfReferenceUID", 64),
        )
        # rows created ahead of a prior retrieval carry only what C-FIND said: fill the gaps from the header
        for attr, value in (
            ("modality", _s(ds, "Modality", 16)),
            ("series_number", _i(ds, "SeriesNumber")),
            ("series_description", _s(ds, "SeriesDescription", 64)),
            ("body_part", _s(ds, "BodyPartExamined", 16)),
            ("frame_of_reference_uid", _s(ds, "FrameOfReferenceUID", 64)),
        ):
            if getattr(series, attr) is None and value is not None:
                setattr(series, attr, value)
        if study.study_date is None and _s(ds, "StudyDate", 8):
            study.study_date, study.study_time = _s(ds, "StudyDate", 8), _s(ds, "StudyTime", 16)
        if len(self._series_pk) > 10000:
            self._series_pk.clear()
        self._series_pk[series.series_instance_uid] = series.id
        series.instance_count = (series.instance_count or 0) + 1
        series.first_received_at = series.first_received_at or now
        series.last_received_at = now
        reopened = False
        if series.state == SeriesState.COMPLETE:
            series.state = SeriesState.RECEIVING
            reopened = True
            audit(
                s,
                self.actor,
                "series.reopened",
                "series",
                series.series_instance_uid,
                sop_instance_uid=str(ds.SOPInstanceUID),
                calling_ae=calling_ae,
            )
        s.add(
            Instance(
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(meta.MediaStorageSOPClassUID),
                series_pk=series.id,
                transfer_syntax_uid=str(meta.TransferSyntaxUID),
                file_path=str(path),
                size_bytes=size,
                sha256=sha,
                instance_number=_i(ds, "InstanceNumber"),
                sender_ae=(calling_ae or "")[:16] or None,
                received_at=now,
                association_uid=getattr(self._association, "value", None),
            )
        )
        if conflict:
            audit(
                s,
                self.actor,
                "instance.duplicate_uid_different_bytes",
                "instance",
                str(ds.SOPInstanceUID),
                kept=[k.file_path for k in conflict] + [str(path)],
                sha256_new=sha,
                sha256_known=[k.sha256 for k in conflict],
                calling_ae=calling_ae,
                peer=peer,
            )
            log.warning("SOP Instance UID %s received again with different bytes: both kept", ds.SOPInstanceUID)
        return reopened


def ingest_part10(ingestor: Ingestor, raw: bytes, calling_ae: str | None = None) -> IngestResult:
    """Ingest a DICOM Part 10 byte string (C-GET/DICOMweb retrieval, tests): its meta re-used, dataset verbatim."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = BytesIO(raw)
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    except Exception as exc:
        return IngestResult(CANNOT_UNDERSTAND, f"not a DICOM Part 10 file: {exc}"[:64])
    return ingestor.ingest(meta, raw[fp.tell() :], calling_ae=calling_ae)


def ingest_file(ingestor: Ingestor, path: Path, calling_ae: str | None = None) -> IngestResult:
    return ingest_part10(ingestor, Path(path).read_bytes(), calling_ae)
