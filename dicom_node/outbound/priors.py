"""Prior lookup and retrieval: implements :class:`pipeline.jobs.ports.PriorSource`.

Priors are earlier studies of the same patient (PatientID + IssuerOfPatientID when present) whose CT series is
referenced by a DICOM SEG (Referenced Series Sequence), a TID 1500 SR (evidence sequences), a presentation state
(GSPS, Referenced Series Sequence) or an RT structure set (Referenced Frame of Reference Sequence). The local database
is searched first, then every PACS peer with ``query = true``: C-FIND (Study Root) at STUDY then SERIES level,
annotation series fetched (they are small) to read their references, CT series fetched by ``retrieve()`` with the
peer's method: C-MOVE to our own AE, C-GET, or DICOMweb (QIDO-RS / WADO-RS). A series of which every instance the
peer reports (NumberOfSeriesRelatedInstances) is already stored here is not retrieved again.

A prior is used only when it is whole (issue 29): after a retrieval we wait (``dicom.retrieval_wait_seconds``) until
our own receivers have indexed every instance the peer reports (C-FIND count, or the retrieval's completed
sub-operations); a prior found locally is counted against the peer that sent it, re-retrieved when short, and
waited for while an association still delivers it; every CT instance an annotation references must be held. A prior
that is still short raises :class:`IncompletePrior` — the job retries later and never analyses half a prior. A peer
whose query fails (e.g. C-FIND refused) is not the same as "no prior": when nothing annotated was found and a peer
failed, the lookup raises, so the job retries and shows why.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.config.settings import PacsPeer, RetrieveMethod, Settings
from lesiontrack.db.models import Instance, OpenTransfer, Patient, RoutingDecision, Series, Study
from lesiontrack.db.repository import audit, get_or_create_patient, get_or_create_series, get_or_create_study
from lesiontrack.db.session import session_scope
from lesiontrack.dicom_node.inbound.ingest import Ingestor, ingest_part10
from lesiontrack.dicom_node.inbound.integrity import INCOMPLETE
from lesiontrack.dicom_node.inbound.pacs_count import sending_peer
from lesiontrack.dicom_node.inbound.routing import PRIOR_RETRIEVAL_REASON
from lesiontrack.dicom_node.inbound.scp import storage_root
from lesiontrack.dicom_node.inbound.storage import InstanceStore
from lesiontrack.dicom_node.outbound.scu import find, get, move
from lesiontrack.pipeline.dicom.annotations.refs import PRIOR_ANNOTATION_MODALITIES
from lesiontrack.pipeline.dicom.annotations.refs import prior_annotation_references as pipeline_annotation_references
from lesiontrack.pipeline.jobs.ports import PROMPT_FILE, PriorAnnotation, PriorTimepoint

log = logging.getLogger(__name__)

ANNOTATION_MODALITIES = PRIOR_ANNOTATION_MODALITIES  # SEG, SR, PR (GSPS), RTSTRUCT


class PriorLookupError(RuntimeError):
    """Prior lookup or retrieval failed (unknown series, peer unreachable, nothing retrieved)."""


class IncompletePrior(PriorLookupError):
    """A prior series is not whole here: fewer instances indexed than the PACS reports, still being received,
    or an annotation references CT instances not held. Transient: the job retries; it never analyses it."""


@dataclass(frozen=True)
class _Study:
    uid: str
    date: str | None
    time: str | None


def _key(date: str | None, time: str | None) -> tuple[str, str]:
    return (date or "", (time or "").split(".")[0].ljust(6, "0"))


def _earlier(date: str | None, time: str | None, before: tuple[str | None, str | None] | None) -> bool:
    if before is None or not before[0]:
        return True  # no reference date: every other study counts (ordered by date)
    if not date:
        return False  # an undated study cannot be placed before the follow-up
    return _key(date, time) < _key(*before)


def _series_with_instances(s: Session, study_pks: list[int]) -> set[int]:
    """The series (primary keys) of these studies that hold at least one instance (one query)."""
    if not study_pks:
        return set()
    q = (
        select(Instance.series_pk)
        .join(Series, Series.id == Instance.series_pk)
        .where(Series.study_pk.in_(study_pks))
        .distinct()
    )
    return set(s.scalars(q))


def same_issuer(a: str | None, b: str | None) -> bool:
    """IssuerOfPatientID decides only when both sides have one (many archives leave it empty)."""
    return not a or not b or a == b


def annotation_references(ds: Dataset) -> tuple[str | None, set[str]]:
    """('SEG'|'SR'|'PR'|'RTSTRUCT'|None, referenced series UIDs) for one annotation object header (one reading of the
    references for the whole service: :func:`pipeline.dicom.annotations.refs.prior_annotation_references`)."""
    kind, refs = pipeline_annotation_references(ds)
    return kind, set(refs)


def referenced_instances(ds: Dataset, series_uid: str) -> set[str]:
    """SOP Instance UIDs of ``series_uid`` an annotation references: a SEG's Referenced Series Sequence
    (Referenced Instance Sequence), an SR's evidence sequences (Referenced SOP Sequence)."""
    out: set[str] = set()
    series_items = list(ds.get("ReferencedSeriesSequence", []) or [])
    for ev_name in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in ds.get(ev_name, []) or []:
            series_items.extend(study.get("ReferencedSeriesSequence", []) or [])
    for item in series_items:
        if str(item.get("SeriesInstanceUID", "")) != series_uid:
            continue
        for seq in ("ReferencedInstanceSequence", "ReferencedSOPSequence"):
            for ref in item.get(seq, []) or []:
                uid = ref.get("ReferencedSOPInstanceUID")
                if uid:
                    out.add(str(uid))
    return out


_REF_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "Modality",
    "ReferencedSeriesSequence",
    "ContentTemplateSequence",
    "ConceptNameCodeSequence",
    "CurrentRequestedProcedureEvidenceSequence",
    "PertinentOtherEvidenceSequence",
    "ReferencedFrameOfReferenceSequence",
]


class PriorFinder:
    """Local database first, then the configured peers."""

    actor = "prior-lookup"

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        ingestor: Ingestor | None = None,
        query_peers: bool = True,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.query_peers = query_peers
        if ingestor is None:
            ingestor = Ingestor(InstanceStore(storage_root(settings), settings.dicom.fsync), session_factory)
        self.ingestor = ingestor
        #: (peer name, series UID) → NumberOfSeriesRelatedInstances the peer reported (None = not reported)
        self._remote_counts: dict[tuple[str, str], int | None] = {}

    # -- PriorSource -------------------------------------------------------------------------------------------
    def find_priors(self, followup_series_uid: str) -> list[PriorTimepoint]:
        with session_scope(self.session_factory) as s:
            series = s.scalar(select(Series).where(Series.series_instance_uid == followup_series_uid))
            if series is None:
                raise PriorLookupError(f"follow-up series {followup_series_uid} is not in the database")
            study = s.get(Study, series.study_pk)
            patient = s.get(Patient, study.patient_pk) if study is not None else None
            if study is None or patient is None:
                raise PriorLookupError(f"follow-up series {followup_series_uid} has no study/patient row")
            pid, issuer = patient.patient_id, patient.issuer or None
            before = (study.study_date, study.study_time)
            exclude = study.study_instance_uid
        return self.find_for_patient(pid, issuer, before=before, exclude_study=exclude)

    def find_for_patient(
        self,
        patient_id: str,
        issuer: str | None = None,
        before: tuple[str | None, str | None] | None = None,
        exclude_study: str | None = None,
    ) -> list[PriorTimepoint]:
        if not patient_id:
            raise PriorLookupError("no PatientID: priors cannot be matched")
        found = {tp.ct_series_uid: tp for tp in self._local(patient_id, issuer, before, exclude_study)}
        failures: list[str] = []
        if self.query_peers:
            for peer in self.settings.pacs:
                if not peer.query:
                    continue
                try:
                    for tp in self._remote(peer, patient_id, issuer, before, exclude_study, set(found)):
                        found.setdefault(tp.ct_series_uid, tp)
                except Exception as exc:
                    log.warning("prior lookup on %s failed: %s", peer.name, exc)
                    failures.append(f"{peer.name}: {type(exc).__name__}: {exc}")
                    with session_scope(self.session_factory) as s:
                        audit(s, self.actor, "priors.peer_failed", "peer", peer.name, error=str(exc)[:500])
        out = sorted(found.values(), key=lambda tp: (_key(tp.study_date, tp.study_time), tp.ct_series_uid))
        if failures and not any(tp.annotations for tp in out):
            # "no prior" would be a guess: the peer that may hold it did not answer (or refused the query)
            raise PriorLookupError(f"prior lookup failed on {'; '.join(failures)}"[:1000])
        log.debug("found %d prior timepoint(s): %s", len(out), [(t.study_uid, t.source) for t in out])
        return out

    def retrieve(self, prior: PriorTimepoint) -> PriorTimepoint:
        """Bring the prior CT (and its annotations) here, whole: see the module docstring."""
        if prior.source != "local":
            peer = self.settings.peer(prior.source)
            self._fetch_unless_held(peer, prior.study_uid, prior.ct_series_uid)
        else:
            self._make_local_whole(prior.study_uid, prior.ct_series_uid)
        self._await_transfers_ended(prior.ct_series_uid)
        prior.ct_files = self._series_files(prior.ct_series_uid)
        if not prior.ct_files:
            raise PriorLookupError(f"prior CT series {prior.ct_series_uid} from {prior.source}: no files retrieved")
        for ann in prior.annotations:
            if not ann.files:
                ann.files = self._instance_files(ann.sop_instance_uid)
        self._check_references(prior)
        return prior

    # -- wholeness -----------------------------------------------------------------------------------------------
    def _make_local_whole(self, study_uid: str, series_uid: str) -> None:
        """A prior found here: counted against the peer that sent it (or retrieved it), re-retrieved when short."""
        with session_scope(self.session_factory) as s:
            series = s.scalar(select(Series).where(Series.series_instance_uid == series_uid))
            if series is None:
                return
            reason = series.routing_reason or ""
            if reason.startswith(INCOMPLETE):
                raise IncompletePrior(f"prior CT series {series_uid} is held: {reason}")
            peer = sending_peer(self.settings, s, series) if self.query_peers else None
        if peer is None:
            return
        key = (peer.name, series_uid)
        try:
            self._find_series(peer, study_uid, series_uid)
        except Exception as exc:
            log.warning("cannot count prior series %s on %s (%s); using what is held", series_uid, peer.name, exc)
            return
        remote = self._remote_counts.get(key)
        held = self._held_count(series_uid)
        if remote is not None and held < remote:
            log.info("prior series %s: %d of %d instances held; retrieving it from %s", series_uid, held, remote,
                     peer.name)  # fmt: skip
            self._fetch_series(peer, study_uid, series_uid)

    def _await_indexed(self, peer: PacsPeer, series_uid: str, at_least: int = 0) -> None:
        """Wait until our receivers indexed every instance of ``series_uid`` the peer reports (or the retrieval
        said it sent); :class:`IncompletePrior` when they have not within ``dicom.retrieval_wait_seconds``."""
        remote = self._remote_counts.get((peer.name, series_uid))
        expected = max(remote or 0, at_least)
        if expected <= 0:
            return
        wait = self.settings.dicom.retrieval_wait_seconds
        deadline = time.monotonic() + wait
        while True:
            held = self._held_count(series_uid)
            if held >= expected:
                return
            if time.monotonic() >= deadline:
                raise IncompletePrior(
                    f"prior series {series_uid} from {peer.name}: {held} of {expected} instances indexed "
                    f"{wait:.0f} s after its retrieval"
                )
            time.sleep(0.2)  # the receivers' journals are committed every 250 ms

    def _await_transfers_ended(self, series_uid: str) -> None:
        """A series some association is still delivering (a retrieval in flight) is waited for, bounded."""
        wait = self.settings.dicom.retrieval_wait_seconds
        deadline = time.monotonic() + wait
        while True:
            with session_scope(self.session_factory) as s:
                still = s.scalar(select(OpenTransfer.pid).where(OpenTransfer.series_uid == series_uid)) is not None
            if not still:
                return
            if time.monotonic() >= deadline:
                raise IncompletePrior(f"prior series {series_uid} is still being received after {wait:.0f} s")
            time.sleep(0.2)

    def _check_references(self, prior: PriorTimepoint) -> None:
        """Every instance of the prior CT that one of its annotations references is held here."""
        with session_scope(self.session_factory) as s:
            held = set(
                s.scalars(
                    select(Instance.sop_instance_uid)
                    .join(Series, Instance.series_pk == Series.id)
                    .where(Series.series_instance_uid == prior.ct_series_uid)
                )
            )
        for ann in prior.annotations:
            if ann.modality == PROMPT_FILE:
                continue  # a prompts JSON (`track --prompts`) holds points in patient space, no instance references
            for f in ann.files[:1]:
                try:
                    hdr = dcmread(f, stop_before_pixels=True, specific_tags=_REF_TAGS)
                except Exception as exc:
                    raise PriorLookupError(
                        f"prior {ann.modality} {ann.sop_instance_uid}: {f} unreadable: {exc}"
                    ) from exc
                missing = referenced_instances(hdr, prior.ct_series_uid) - held
                if missing:
                    raise IncompletePrior(
                        f"prior {ann.modality} {ann.sop_instance_uid} references {len(missing)} instance(s) of CT "
                        f"series {prior.ct_series_uid} not held here ({len(held)} held)"
                    )

    # -- local ---------------------------------------------------------------------------------------------------
    def _local(
        self,
        patient_id: str,
        issuer: str | None,
        before: tuple[str | None, str | None] | None,
        exclude_study: str | None,
    ) -> list[PriorTimepoint]:
        with session_scope(self.session_factory) as s:
            patients = [
                p.id
                for p in s.scalars(select(Patient).where(Patient.patient_id == patient_id))
                if same_issuer(p.issuer, issuer)
            ]
            if not patients:
                return []
            studies = [
                st
                for st in s.scalars(select(Study).where(Study.patient_pk.in_(patients)))
                if st.study_instance_uid != exclude_study and _earlier(st.study_date, st.study_time, before)
            ]
            ct: dict[str, tuple[Study, Series]] = {}
            annotations: list[tuple[Instance, str]] = []
            # a CT series row with no instance (created ahead of a retrieval that matching only planned: a PACS-only
            # study whose annotations were fetched) is not held: the PACS lookup finds it
            held = _series_with_instances(s, [st.id for st in studies])
            for st in studies:
                for se in s.scalars(select(Series).where(Series.study_pk == st.id)):
                    if (se.modality or "").upper() == "CT" and se.id in held:
                        ct[se.series_instance_uid] = (st, se)
                    elif (se.modality or "").upper() in ANNOTATION_MODALITIES:
                        for inst in s.scalars(select(Instance).where(Instance.series_pk == se.id)):
                            annotations.append((inst, se.modality or ""))
            timepoints: dict[str, PriorTimepoint] = {}
            for inst, _modality in annotations:
                try:
                    hdr = dcmread(inst.file_path, stop_before_pixels=True, specific_tags=_REF_TAGS)
                except Exception as exc:
                    log.warning("cannot read annotation %s: %s", inst.file_path, exc)
                    continue
                kind, refs = annotation_references(hdr)
                if kind is None:
                    continue
                for ref in refs & set(ct):
                    st, se = ct[ref]
                    tp = timepoints.setdefault(
                        ref,
                        PriorTimepoint(
                            study_uid=st.study_instance_uid,
                            study_date=st.study_date,
                            study_time=st.study_time,
                            ct_series_uid=ref,
                            source="local",
                        ),
                    )
                    tp.annotations.append(
                        PriorAnnotation(inst.sop_instance_uid, inst.sop_class_uid, kind, [Path(inst.file_path)])
                    )
        return list(timepoints.values())

    def _series_files(self, series_uid: str) -> list[Path]:
        with session_scope(self.session_factory) as s:
            rows = s.execute(
                select(Instance.file_path)
                .join(Series, Instance.series_pk == Series.id)
                .where(Series.series_instance_uid == series_uid)
                .order_by(Instance.instance_number, Instance.id)
            ).scalars()
            return [Path(p) for p in rows]

    def _instance_files(self, sop_uid: str) -> list[Path]:
        with session_scope(self.session_factory) as s:
            return [Path(p) for p in s.scalars(select(Instance.file_path).where(Instance.sop_instance_uid == sop_uid))]

    # -- remote --------------------------------------------------------------------------------------------------
    def _remote(
        self,
        peer: PacsPeer,
        patient_id: str,
        issuer: str | None,
        before: tuple[str | None, str | None] | None,
        exclude_study: str | None,
        known_ct: set[str],
    ) -> list[PriorTimepoint]:
        studies = [
            st
            for st in self._find_studies(peer, patient_id, issuer, before)
            if st.uid != exclude_study and _earlier(st.date, st.time, before)
        ]
        out: list[PriorTimepoint] = []
        for st in studies:
            series = self._find_series(peer, st.uid)
            ct = {uid: mod for uid, mod in series.items() if mod == "CT"}
            ann_series = [uid for uid, mod in series.items() if mod in ANNOTATION_MODALITIES]
            if not ct or not ann_series:
                continue
            timepoints: dict[str, PriorTimepoint] = {}
            for ann_uid in ann_series:
                self._mark_prior(patient_id, issuer, st, ann_uid, series[ann_uid], peer.name)
                self._fetch_unless_held(peer, st.uid, ann_uid)
                with session_scope(self.session_factory) as s:
                    rows = list(
                        s.execute(
                            select(Instance.sop_instance_uid, Instance.sop_class_uid, Instance.file_path)
                            .join(Series, Instance.series_pk == Series.id)
                            .where(Series.series_instance_uid == ann_uid)
                        )
                    )
                for sop_uid, sop_class, path in rows:
                    kind, refs = annotation_references(dcmread(path, stop_before_pixels=True, specific_tags=_REF_TAGS))
                    if kind is None:
                        continue
                    for ref in refs & set(ct):
                        if ref in known_ct:
                            continue
                        tp = timepoints.setdefault(
                            ref,
                            PriorTimepoint(
                                study_uid=st.uid,
                                study_date=st.date,
                                study_time=st.time,
                                ct_series_uid=ref,
                                source=peer.name,
                            ),
                        )
                        tp.annotations.append(PriorAnnotation(sop_uid, sop_class, kind, [Path(path)]))
            for ref in timepoints:
                self._mark_prior(patient_id, issuer, st, ref, "CT", peer.name)
            out.extend(timepoints.values())
        return out

    def _find_studies(
        self, peer: PacsPeer, patient_id: str, issuer: str | None, before: tuple[str | None, str | None] | None
    ) -> list[_Study]:
        if peer.retrieve_method == RetrieveMethod.DICOMWEB:
            client = self._dicomweb(peer)
            res = client.search_for_studies(
                search_filters={"PatientID": patient_id}, fields=["StudyDate", "StudyTime", "IssuerOfPatientID"]
            )
            return [
                _Study(str(d.StudyInstanceUID), d.get("StudyDate") or None, d.get("StudyTime") or None)
                for d in (Dataset.from_json(r) for r in res)
                if same_issuer(str(d.get("IssuerOfPatientID") or ""), issuer)
            ]
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.PatientID = patient_id
        q.IssuerOfPatientID = ""  # returned, compared below (an empty issuer matches any)
        q.StudyInstanceUID = ""
        q.StudyDate = f"-{before[0]}" if before and before[0] else ""
        q.StudyTime = ""
        return [
            _Study(
                str(r.StudyInstanceUID), str(r.get("StudyDate") or "") or None, str(r.get("StudyTime") or "") or None
            )
            for r in find(self.settings, peer, q)
            if r.get("StudyInstanceUID") and same_issuer(str(r.get("IssuerOfPatientID") or ""), issuer)
        ]

    def _find_series(self, peer: PacsPeer, study_uid: str, series_uid: str | None = None) -> dict[str, str]:
        """Series UID → modality of one study on ``peer``; their instance counts go to ``self._remote_counts``."""
        if peer.retrieve_method == RetrieveMethod.DICOMWEB:
            client = self._dicomweb(peer)
            filters = {"SeriesInstanceUID": series_uid} if series_uid else None
            res = client.search_for_series(
                study_instance_uid=study_uid,
                fields=["Modality", "NumberOfSeriesRelatedInstances"],
                search_filters=filters,
            )
            rows = [Dataset.from_json(r) for r in res]
        else:
            q = Dataset()
            q.QueryRetrieveLevel = "SERIES"
            q.StudyInstanceUID = study_uid
            q.SeriesInstanceUID = series_uid or ""
            q.Modality = ""
            q.NumberOfSeriesRelatedInstances = ""
            rows = [r for r in find(self.settings, peer, q) if r.get("SeriesInstanceUID")]
        out: dict[str, str] = {}
        for d in rows:
            uid = str(d.SeriesInstanceUID)
            out[uid] = str(d.get("Modality", "")).upper()
            try:
                n = d.get("NumberOfSeriesRelatedInstances")
                self._remote_counts[(peer.name, uid)] = int(n) if n not in (None, "") else None
            except (TypeError, ValueError):
                self._remote_counts[(peer.name, uid)] = None
        return out

    def _held_count(self, series_uid: str) -> int:
        with session_scope(self.session_factory) as s:
            return int(
                s.scalar(
                    select(func.count(func.distinct(Instance.sop_instance_uid)))
                    .join(Series, Instance.series_pk == Series.id)
                    .where(Series.series_instance_uid == series_uid)
                )
                or 0
            )

    def _fetch_unless_held(self, peer: PacsPeer, study_uid: str, series_uid: str) -> bool:
        """Retrieve a series unless every instance the peer reports is already stored here; True = fetched."""
        held = self._held_count(series_uid)
        if held:
            key = (peer.name, series_uid)
            self._remote_counts.pop(key, None)  # counted now: the PACS may have received more since
            try:
                self._find_series(peer, study_uid, series_uid)
            except Exception as exc:
                log.warning("cannot count series %s on %s (%s); retrieving it", series_uid, peer.name, exc)
            remote = self._remote_counts.get(key)
            if remote is not None and held >= remote:
                log.debug(
                    "series %s: all %d instances already held; not retrieved from %s", series_uid, held, peer.name
                )
                with session_scope(self.session_factory) as s:
                    audit(s, self.actor, "priors.already_held", "series", series_uid, peer=peer.name, instances=held)
                return False
        self._fetch_series(peer, study_uid, series_uid)
        return True

    def _mark_prior(
        self, patient_id: str, issuer: str | None, st: _Study, series_uid: str, modality: str, peer: str
    ) -> None:
        """Create the rows ahead of retrieval so the arriving series is not routed to analysis."""
        with session_scope(self.session_factory) as s:
            patient = get_or_create_patient(s, patient_id, issuer)
            study = get_or_create_study(s, patient, st.uid, study_date=st.date, study_time=st.time)
            series = get_or_create_series(s, study, series_uid, modality=modality or None)
            if series.routing_decision == RoutingDecision.PENDING and series.completed_at is None:
                series.routing_decision = RoutingDecision.SKIP
                series.routing_reason = f"{PRIOR_RETRIEVAL_REASON} from {peer}"

    def _fetch_series(self, peer: PacsPeer, study_uid: str, series_uid: str) -> None:
        method = peer.retrieve_method
        with session_scope(self.session_factory) as s:
            audit(s, self.actor, "priors.retrieve", "series", series_uid, peer=peer.name, method=method.value)
        if method == RetrieveMethod.DICOMWEB:
            client = self._dicomweb(peer)
            n = 0
            for ds in client.iter_series(study_uid, series_uid):
                buf = BytesIO()
                ds.save_as(buf, enforce_file_format=True)
                res = ingest_part10(self.ingestor, buf.getvalue(), calling_ae=peer.ae_title)
                if not res.ok:
                    raise PriorLookupError(f"WADO-RS object from {peer.name} rejected: {res.comment}")
                n += 1
            log.info("retrieved %d objects of series %s from %s by WADO-RS", n, series_uid, peer.name)
            self._await_indexed(peer, series_uid, at_least=n)
            return
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = series_uid
        if method == RetrieveMethod.C_GET:

            def on_store(meta: FileMetaDataset, data: bytes, calling_ae: str) -> int:
                return self.ingestor.ingest(meta, data, calling_ae=calling_ae).status

            retrieved = get(self.settings, peer, q, on_store)
        else:
            retrieved = move(self.settings, peer, q)
        log.info(
            "%s of series %s from %s: completed %d, failed %d, status 0x%04X",
            method.value,
            series_uid,
            peer.name,
            retrieved.completed,
            retrieved.failed,
            retrieved.status or 0,
        )
        if not retrieved.ok:
            raise PriorLookupError(
                f"{method.value} of series {series_uid} from {peer.name} failed: "
                f"status 0x{(retrieved.status or 0):04X}, {retrieved.failed} sub-operations failed"
            )
        # C-MOVE's completion says the PACS sent them, not that our receivers indexed them: wait for that
        self._await_indexed(peer, series_uid, at_least=retrieved.completed + retrieved.warning)

    def _dicomweb(self, peer: PacsPeer) -> DICOMwebClient:
        if not peer.dicomweb_url:
            raise PriorLookupError(f"peer {peer.name}: retrieve_method DICOMWEB needs dicomweb_url")
        return DICOMwebClient(url=peer.dicomweb_url)


#: The name the composition root (``lesiontrack.service``) imports.
DicomPriorSource = PriorFinder
