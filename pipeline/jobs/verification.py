"""Verified tracking: a person's corrected SEG/SR of a follow-up we analysed becomes that timepoint's result.

The flow (docs/verified-tracking.md):

1. :func:`take_in_series` — a completed SEG/SR series (routed from the PACS, or uploaded): every object in it
   that is not ours (Manufacturer, our UID root, our own Instance rows — also in a series of ours, where OHIF saves
   the radiologist's edit of our OHIF measurements SR) and references a CT series we analysed is
   recorded as a :class:`~db.models.TimepointVerification` (who: ContentCreatorName, else the operator / sender;
   when) and an analysis job of that CT series is queued that *adopts* the correction. The same object received
   again does nothing (its SOP Instance UID is unique in the table).
2. The adoption job (the ordinary pipeline: :func:`verification_for_series` tells its steps) takes the reader's
   segments as the timepoint's lesions, matched to tracked lesions (:mod:`pipeline.science.correction_matching`), adopts
   added lesions, retires deleted ones, supersedes our observations there (kept) and issues a new SEG + SR.
3. :func:`reanalyse_later` — then every later analysed follow-up of the patient is re-analysed (new SEG + SR, the
   old ones superseded), now propagated from the verified timepoint, the nearest annotation a person made.
4. :func:`verify_as_is` — an operator accepts our result of a timepoint unchanged: our SEG of it then counts as
   the person's (a propagation source) and later follow-ups are re-analysed from it.
5. :func:`reanalyse_annotated` — a person's annotation (method ``annotation``) of a follow-up whose result lacks
   it (:func:`_use_of`): a result issued without it, or a job running from its load step on, is superseded by a new
   job. A job that has not begun to read its prompts (queued, finding priors) reads it itself: no verification, the
   job's events say so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.config.settings import VerificationSettings
from lesiontrack.db.models import (
    AnalysisJob,
    Instance,
    JobState,
    Series,
    Study,
    TimepointVerification,
    VerificationMethod,
    VerificationState,
)
from lesiontrack.db.repository import audit
from lesiontrack.db.session import session_scope
from lesiontrack.pipeline.dicom.annotations.refs import prior_annotation_references
from lesiontrack.pipeline.dicom.prompt_sources import PROMPT_OBJECTS
from lesiontrack.pipeline.jobs.contract import STEP_NAMES, LoadVolumesOutput, WriteSegSrOutput, read_output
from lesiontrack.pipeline.jobs.derived_prior_seg import earlier_drawn_prior_seg
from lesiontrack.pipeline.jobs.store import ACTIVE_STATES, JobStore
from lesiontrack.pipeline.science.prompt_selection import OUR_MANUFACTURER, written_by_us

log = logging.getLogger(__name__)

#: the annotation objects that replace a timepoint's lesions (a correction); a GSPS or RTSTRUCT marks some of them
CORRECTION_KINDS = ("SEG", "SR")

ANALYSED_STATES = (JobState.DONE, JobState.SUPERSEDED, JobState.RUNNING, JobState.QUEUED, JobState.RETRY_WAIT)

#: how the newest analysis of a CT series stands to a person's annotation of it (:func:`_use_of`)
AnnotationUse = Literal["read", "will-read", "without", "none"]


class VerificationError(ValueError):
    """A verification cannot be taken (the series was never analysed, the object is ours, ...)."""


@dataclass(frozen=True)
class AnnotationHeader:
    """What recognition reads from one SEG/SR object."""

    path: Path
    sop_instance_uid: str
    series_uid: str
    modality: str
    manufacturer: str
    creator: str | None
    references: list[str]
    all_manual: bool  # a SEG whose segments are all MANUAL
    study_uid: str = ""

    @classmethod
    def read(cls, path: Path) -> AnnotationHeader | None:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            return None
        kind, refs = prior_annotation_references(ds)
        if kind is None:
            return None
        creator = ds.get("ContentCreatorName") or ds.get("OperatorsName") or None
        kinds = {str(s.get("SegmentAlgorithmType", "")).upper() for s in ds.get("SegmentSequence", [])}
        return cls(
            path,
            str(ds.SOPInstanceUID),
            str(ds.SeriesInstanceUID),
            kind,
            str(ds.get("Manufacturer", "")),
            str(creator) if creator else None,
            refs,
            kind == "SEG" and kinds == {"MANUAL"},
            str(ds.get("StudyInstanceUID", "")),
        )

    def is_ours(self, our_sop_uids: set[str]) -> bool:
        """Written by LesionTrack (and not re-issued by a reader as a manual SEG)."""
        if self.sop_instance_uid in our_sop_uids:
            return True
        return self.manufacturer == OUR_MANUFACTURER and not self.all_manual


@dataclass(frozen=True)
class VerificationView:
    """A detached snapshot of one verification (API, dashboard, exports, the pipeline's steps)."""

    id: int
    patient_pk: int
    series_uid: str
    method: VerificationMethod
    source_sop_instance_uid: str | None
    source_file: str | None
    verified_by: str
    verified_at: datetime
    state: VerificationState
    job_id: int | None
    reason: str | None
    matches: list[dict[str, object]]
    reanalysis_jobs: list[int]

    @classmethod
    def of(cls, v: TimepointVerification) -> VerificationView:
        return cls(
            v.id,
            v.patient_pk,
            v.series_instance_uid,
            VerificationMethod(v.method),
            v.source_sop_instance_uid,
            v.source_file,
            v.verified_by,
            v.verified_at,
            VerificationState(v.state),
            v.job_pk,
            v.reason,
            list(v.matches or []),
            [int(j) for j in v.reanalysis_jobs or []],
        )


def analysed(session: Session, series_uid: str) -> bool:
    """Did LesionTrack analyse (or is it analysing) this CT series."""
    return (
        session.scalar(
            select(AnalysisJob.id).where(
                AnalysisJob.followup_series_uid == series_uid, AnalysisJob.state.in_(ANALYSED_STATES)
            )
        )
        is not None
    )


def _our_sop_uids(session: Session, uids: list[str]) -> set[str]:
    """Instances of series we created that we wrote (a person's object saved into such a series is not ours)."""
    rows = session.execute(
        select(Instance.sop_instance_uid, Instance.file_path)
        .join(Series, Instance.series_pk == Series.id)
        .where(Series.created_by_us.is_(True), Instance.sop_instance_uid.in_(uids))
    ).all()
    return {uid for uid, path in rows if written_by_us(path)}


def holds_person_object(session: Session, series: Series) -> bool:
    """A series we created that also holds an object a person made: OHIF saves a radiologist's SR into the series
    it hydrated the measurements from (our OHIF measurements SR's, docs/viewer.md)."""
    paths = session.scalars(select(Instance.file_path).where(Instance.series_pk == series.id))
    return series.created_by_us and any(not written_by_us(p) for p in paths)


def _patient_of(session: Session, series_uid: str) -> int | None:
    return session.scalar(
        select(Study.patient_pk)
        .join(Series, Series.study_pk == Study.id)
        .where(Series.series_instance_uid == series_uid)
    )


def _latest_job(session: Session, series_uid: str) -> AnalysisJob | None:
    return session.scalars(
        select(AnalysisJob).where(AnalysisJob.followup_series_uid == series_uid).order_by(AnalysisJob.id.desc())
    ).first()


def take_in_series(
    sf: sessionmaker[Session],
    settings: VerificationSettings,
    series_uid: str,
    *,
    actor: str = "dicom-node",
    operator: str | None = None,
    vouched: bool = False,
) -> list[int]:
    """Recognise the corrections and late annotations in one completed annotation series; returns the jobs queued
    (none when the objects are ours, change no result we issued, were taken in before, or corrections are not
    accepted — the series' routing reason then says which).

    ``vouched``: the operator states that a person made or verified these objects (``lesiontrack track
    --confirmed``), so a result of ours among them counts as verified, like a reader's re-issued SEG."""
    accepted: list[_Accepted] = []
    with session_scope(sf) as s:
        series = s.scalar(select(Series).where(Series.series_instance_uid == series_uid))
        if series is None:
            return []
        instances = list(s.scalars(select(Instance).where(Instance.series_pk == series.id).order_by(Instance.id)))
        ours = _our_sop_uids(s, [i.sop_instance_uid for i in instances])
        if not vouched and series.created_by_us and all(i.sop_instance_uid in ours for i in instances):
            return []  # our own result, nothing a person added to it
        notes: list[str] = []
        for inst in instances:
            header = AnnotationHeader.read(Path(inst.file_path))
            if header is None or (header.is_ours(ours) and not vouched):
                continue
            note, taken = _take_in(s, _Intake(settings, series_uid, actor, operator), inst, header)
            if note is not None:
                notes.append(note)
            if taken is not None:
                accepted.append(taken)
        if notes:
            series.routing_reason = ("annotation: " + "; ".join(notes))[:2000]
    return _queue_adoptions(sf, accepted, actor, settings)


@dataclass
class _Intake:
    """Who takes in a correction series, and under which settings."""

    settings: VerificationSettings
    series_uid: str
    actor: str
    operator: str | None


@dataclass(frozen=True)
class _Accepted:
    """A verification taken in: its id, the CT series, who, and what it is — a correction of our result of a
    follow-up (adopted), of the SEG we derived on a prior from a drawing, or a late annotation (re-analysis)."""

    vid: int
    ct_uid: str
    who: str
    kind: Literal["correction", "drawn-prior", "annotation"]


def _take_in(
    s: Session, intake: _Intake, inst: Instance, header: AnnotationHeader
) -> tuple[str | None, _Accepted | None]:
    """One annotation object of a series: what the series' routing reason says about it (None: nothing), and the
    verification it was accepted as, if it was."""
    # a correction corrects a result we issued: a radiologist's annotation that arrives with its CT (a baseline
    # SEG, or one of a follow-up still being analysed) is a prompt source, not a verification. Only a SEG or an SR
    # replaces a timepoint's lesions; a GSPS or RTSTRUCT marks some of them (an arrow, a line): a late annotation
    corrects = header.modality in CORRECTION_KINDS
    targets = [u for u in header.references if corrects and our_seg_of_series(s, u) is not None]
    # ... or the SEG we derived on a prior from a radiologist's drawing (pipeline.jobs.derived_prior_seg): its
    # correction verifies the prior timepoint; later follow-ups are re-analysed from it (no adoption job)
    prior_targets = [u for u in header.references if corrects and _drawn_prior_seg_on(s, u)]
    if not targets and prior_targets:
        targets = prior_targets
    if not targets:
        return _take_in_annotation(s, intake, inst, header)
    ct_uid = targets[0]
    refused = _refused(s, intake, inst, header, ct_uid, "correction")
    if refused is not None:
        return refused, None
    v = _record(s, intake, inst, header, ct_uid, VerificationMethod.CORRECTION)
    if v is None:
        return None, None
    kind: Literal["correction", "drawn-prior"] = "drawn-prior" if ct_uid in prior_targets else "correction"
    return f"correction of {ct_uid}: verification {v.id}", _Accepted(v.id, ct_uid, v.verified_by, kind)


def _take_in_annotation(
    s: Session, intake: _Intake, inst: Instance, header: AnnotationHeader
) -> tuple[str | None, _Accepted | None]:
    """A person's annotation that is no correction: when it annotates a follow-up we issued a result for, or a
    timepoint whose later follow-ups have results, those results were made without it — it is recorded (method
    ``annotation``) and they are re-analysed, new instances superseding the old (:func:`reanalyse_annotated`).
    Otherwise it is a prior annotation like any other: the next analysis reads it."""
    name = PROMPT_OBJECTS.get(header.modality, header.modality)
    sop = header.sop_instance_uid
    # how each referenced series' newest job stands to it: read once (it scans the series' jobs), used below
    uses = {u: _use_of(s, u, sop, inst.received_at) for u in header.references}
    ct_uid = next((u for u in header.references if _analyses_without(s, u, uses[u][0], inst.received_at)), None)
    if ct_uid is None:
        pending = _read_by_pending_job(s, intake.actor, header, uses)
        return pending or f"{name} annotates no series LesionTrack issued a result for (kept as prior annotation)", None
    refused = _refused(s, intake, inst, header, ct_uid, f"{name} annotation")
    if refused is not None:
        return refused, None
    study = header.study_uid or "?"
    v = _record(s, intake, inst, header, ct_uid, VerificationMethod.ANNOTATION)
    if v is None:
        return None, None
    v.reason = f"{name} {sop} by {v.verified_by} arrived on study {study} (series {ct_uid})"
    job = uses[ct_uid][1]
    if job is not None and job.state in ACTIVE_STATES:  # the series' first analysis (or a re-analysis) in progress
        v.reason += f" while job {job.id} was {job.state.value}"
    return f"{name} {header.sop_instance_uid} on {ct_uid}: annotation {v.id}", _Accepted(
        v.id, ct_uid, v.verified_by, "annotation"
    )


def _read_by_pending_job(
    s: Session, actor: str, header: AnnotationHeader, uses: dict[str, tuple[AnnotationUse, AnalysisJob | None]]
) -> str | None:
    """A person's annotation of a series whose job has not begun to read its prompts (queued, or finding its priors):
    that job reads it as a prompt there (no verification, no new job) — said in the job's events
    (``job.annotation_arrived``); what the series' reason says (None: no such job). ``uses``: :func:`_use_of` of
    each series it references."""
    name, sop = PROMPT_OBJECTS.get(header.modality, header.modality), header.sop_instance_uid
    for u in header.references:
        use, job = uses[u]
        if use == "will-read" and job is not None:
            study, state = header.study_uid or "?", job.state.value
            reason = f"{name} {sop} arrived on study {study} while this job was {state}: it reads it (a prompt there)"
            audit(s, actor, "job.annotation_arrived", "job", job.id, series_uid=u, sop_instance_uid=sop, reason=reason)
            return f"{name} {sop} on {u}: read by job {job.id} ({state}, a prompt there)"
    return None


def _analyses_without(session: Session, series_uid: str, use: AnnotationUse, received_at: datetime) -> list[str]:
    """The CT series whose analysis lacks a person's annotation of ``series_uid`` received at ``received_at``
    (``use``: :func:`_use_of` of it): the series itself when its newest job's result is made without it — issued
    without it, or by a running job that may have read its prompts before it arrived — and the later follow-ups of its
    patient whose newest result was issued before it arrived (a prior annotation retrieved for a job, or sent with its
    CT, was that job's input), oldest first."""
    patient_pk = _patient_of(session, series_uid)
    if patient_pk is None:
        return []
    own = [series_uid] if use == "without" else []
    return own + _issued_before(session, later_analysed_series(session, patient_pk, series_uid), received_at)


def _use_of(
    session: Session, series_uid: str, sop_uid: str, received_at: datetime
) -> tuple[AnnotationUse, AnalysisJob | None]:
    """How the newest job of ``series_uid`` stands to a person's annotation of it (``sop_uid``, received at
    ``received_at``), and that job: ``read`` — its load step read it; ``will-read`` — queued or waiting to retry with
    its prompts still to read (a resumed job reads them again unless it resumes after writing its results), or
    running but not yet loading (the object is indexed before it is taken in, so the load step finds it);
    ``without`` — running from the load step on (it may have read its prompts before the object arrived: its result
    is not trusted to hold it), or finished with a result issued without it; ``none`` — no analysis it changes."""
    job = _latest_job(session, series_uid)
    if job is None:
        return "none", None
    outputs = job.step_outputs or {}
    loaded = read_output(outputs, LoadVolumesOutput)
    if loaded is not None and sop_uid in loaded.followup_annotations and job.state is not JobState.FAILED:
        return "read", job
    unwritten = read_output(outputs, WriteSegSrOutput) is None
    if job.state in (JobState.QUEUED, JobState.RETRY_WAIT):
        return ("will-read" if unwritten else "without"), job
    if job.state is JobState.RUNNING:  # the object is indexed: a job that has not begun to load reads it
        return ("will-read" if unwritten and _before_loading(job) else "without"), job
    if job.state is JobState.DONE:
        return ("without" if _result_issued_at(session, series_uid) is not None else "none"), job
    return ("without" if _issued_before(session, [series_uid], received_at) else "none"), job


def _before_loading(job: AnalysisJob) -> bool:
    """A running job that has not begun the step that reads its prompts (claimed, or finding/retrieving priors)."""
    steps = STEP_NAMES
    return job.step is None or (job.step in steps and steps.index(job.step) < steps.index(LoadVolumesOutput.step))


def _issued_before(session: Session, series_uids: list[str], t: datetime) -> list[str]:
    """Those of ``series_uids`` whose newest result was issued before ``t``."""
    out = []
    for u in series_uids:
        issued = _result_issued_at(session, u)
        if issued is not None and issued < _utc(t):
            out.append(u)
    return out


def _arrived(session: Session, v: TimepointVerification) -> datetime:
    """When the object of a verification was received (its take-in time when it is not on file)."""
    at = session.scalar(select(Instance.received_at).where(Instance.sop_instance_uid == v.source_sop_instance_uid))
    return at if at is not None else v.verified_at


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t


def _result_issued_at(session: Session, series_uid: str) -> datetime | None:
    """When the newest job of the series that issued a SEG finished (None: none did)."""
    q = select(AnalysisJob).where(AnalysisJob.followup_series_uid == series_uid).order_by(AnalysisJob.id.desc())
    for job in session.scalars(q):
        out = read_output(job.step_outputs or {}, WriteSegSrOutput)
        if out is not None and out.seg and job.finished_at is not None:
            return _utc(job.finished_at)
    return None


def _refused(
    s: Session, intake: _Intake, inst: Instance, header: AnnotationHeader, ct_uid: str, what: str
) -> str | None:
    """Why this object is not taken in (taken in before, corrections off, a sender not accepted); None: taken in."""
    settings, actor = intake.settings, intake.actor
    known = s.scalar(
        select(TimepointVerification).where(TimepointVerification.source_sop_instance_uid == header.sop_instance_uid)
    )
    if known is not None:
        audit(s, actor, "verification.duplicate", "verification", known.id, sop_instance_uid=inst.sop_instance_uid)
        return f"{what} of {ct_uid} taken in before (verification {known.id})"
    if not settings.accept_corrections:
        return f"{what} of {ct_uid} not taken in: verification.accept_corrections is off"
    if settings.accept_from_aes and (inst.sender_ae or "") not in settings.accept_from_aes:
        audit(s, actor, "verification.refused", "series", intake.series_uid, sender_ae=inst.sender_ae, ct=ct_uid)
        return f"{what} of {ct_uid} from AE {inst.sender_ae!r} not taken in: not in verification.accept_from_aes"
    return None


def _record(
    s: Session, intake: _Intake, inst: Instance, header: AnnotationHeader, ct_uid: str, method: VerificationMethod
) -> TimepointVerification | None:
    """The verification row of one object taken in (None: the CT series has no patient)."""
    patient_pk = _patient_of(s, ct_uid)
    if patient_pk is None:
        return None
    who = header.creator or intake.operator or (f"AE {inst.sender_ae}" if inst.sender_ae else intake.actor)
    v = TimepointVerification(
        patient_pk=patient_pk,
        series_instance_uid=ct_uid,
        method=method,
        source_sop_instance_uid=header.sop_instance_uid,
        source_series_uid=header.series_uid,
        source_file=str(header.path),
        source_manufacturer=header.manufacturer[:64] or None,
        sender_ae=inst.sender_ae,
        verified_by=who[:128],
        state=VerificationState.ACCEPTED,
    )
    s.add(v)
    s.flush()
    audit(
        s,
        intake.actor,
        "verification.received",
        "verification",
        v.id,
        series_uid=ct_uid,
        source_sop_instance_uid=header.sop_instance_uid,
        modality=header.modality,
        verified_by=v.verified_by,
        method=method.value,
    )
    return v


def _queue_adoptions(
    sf: sessionmaker[Session],
    accepted: list[_Accepted],
    actor: str,
    settings: VerificationSettings,
) -> list[int]:
    """An adoption job per accepted correction (superseding the series' latest job); a verified drawn prior was
    never analysed as a follow-up: nothing to adopt, its later follow-ups are re-analysed; a late annotation
    re-analyses the results made without it."""
    jobs = JobStore(sf, actor=actor)
    out: list[int] = []
    for a in accepted:
        if a.kind == "drawn-prior":
            log.info("verification %s of the drawn prior on series %s: later follow-ups re-analysed", a.vid, a.ct_uid)
            out += reanalyse_later(sf, a.vid, actor=actor, settings=settings)
            continue
        if a.kind == "annotation":
            out += reanalyse_annotated(sf, a.vid, actor=actor, settings=settings)
            continue
        with session_scope(sf) as s:
            latest = _latest_job(s, a.ct_uid)
        job = jobs.create(
            a.ct_uid,
            reason=f"verified by {a.who}: adopt the correction (verification {a.vid})",
            actor=actor,
            supersedes=latest.id if latest is not None else None,
        )
        with session_scope(sf) as s:
            row = s.get(TimepointVerification, a.vid)
            if row is not None:
                row.job_pk = job
        log.info("verification %s of series %s: adoption job %s", a.vid, a.ct_uid, job)
        out.append(job)
    return out


def reanalyse_annotated(
    sf: sessionmaker[Session], verification_id: int, *, actor: str, settings: VerificationSettings | None = None
) -> list[int]:
    """A late annotation (method ``annotation``): a new analysis of the series it annotates when we issued a result
    for it (the annotation is a person's prompt there), then of the later follow-ups (:func:`reanalyse_later`);
    each supersedes that series' latest job, its reason names the annotation."""
    with session_scope(sf) as s:
        v = s.get(TimepointVerification, verification_id)
        if v is None:
            raise VerificationError(f"no verification {verification_id}")
        ct_uid, why = v.series_instance_uid, v.reason or f"annotation {verification_id}"
        use, latest = _use_of(s, ct_uid, v.source_sop_instance_uid or "", _arrived(s, v))
        latest_id = latest.id if latest is not None else None
    created: list[int] = []
    if use in ("will-read", "without"):
        jobs = JobStore(sf, actor=actor)
        if use == "will-read":  # that queued job reads it: re-triggered with this reason (a new one if claimed since)
            job = jobs.create(ct_uid, reason=f"{why}: read by this job (annotation {verification_id})", actor=actor)
        else:  # a running job stops before its next step (nothing more sent); a finished one's result is kept
            reason = f"re-analysis: {why} (annotation {verification_id})"
            job = jobs.create(ct_uid, reason=reason, actor=actor, supersedes=latest_id)
        if job != latest_id:
            created.append(job)
        with session_scope(sf) as s:
            row = s.get(TimepointVerification, verification_id)
            if row is not None:
                row.job_pk = job
                audit(s, actor, "verification.annotation_reanalysis", "verification", row.id, job_id=job, use=use)
        log.info("annotation %s of series %s: job %s (%s)", verification_id, ct_uid, job, use)
    return created + reanalyse_later(sf, verification_id, actor=actor, settings=settings)


def verification_for_series(session: Session, series_uid: str) -> VerificationView | None:
    """The newest verification of a CT series that has not failed (the one its results follow)."""
    v = session.scalars(
        select(TimepointVerification)
        .where(
            TimepointVerification.series_instance_uid == series_uid,
            TimepointVerification.state != VerificationState.FAILED,
            TimepointVerification.method != VerificationMethod.ANNOTATION,  # a prompt there, not its result
        )
        .order_by(TimepointVerification.id.desc())
    ).first()
    return VerificationView.of(v) if v is not None else None


def verifications(session: Session, patient_pk: int) -> list[VerificationView]:
    rows = session.scalars(
        select(TimepointVerification)
        .where(TimepointVerification.patient_pk == patient_pk)
        .order_by(TimepointVerification.id)
    )
    return [VerificationView.of(v) for v in rows]


def verified_sop_uids(session: Session, sop_uids: list[str]) -> set[str]:
    """Which of these SEG/SR objects a person verified (corrections and results of ours accepted as is)."""
    if not sop_uids:
        return set()
    rows = session.scalars(
        select(TimepointVerification.source_sop_instance_uid).where(
            TimepointVerification.source_sop_instance_uid.in_(sop_uids),
            TimepointVerification.state != VerificationState.FAILED,
            TimepointVerification.method != VerificationMethod.ANNOTATION,  # a person's drawing, not a verified result
        )
    )
    return {r for r in rows if r}


def later_analysed_series(session: Session, patient_pk: int, series_uid: str) -> list[str]:
    """The CT series of this patient LesionTrack analysed that come after ``series_uid`` in time, oldest first."""
    rows = session.execute(
        select(Series.series_instance_uid, Study.study_date, Study.study_time)
        .join(Study, Series.study_pk == Study.id)
        .where(Study.patient_pk == patient_pk, Series.created_by_us.is_(False))
    ).all()
    key = {uid: (d or "", t or "") for uid, d, t in rows}
    if series_uid not in key:
        return []
    after = [u for u in key if key[u] > key[series_uid] and analysed(session, u)]
    return sorted(after, key=lambda u: key[u])


def reanalyse_later(
    sf: sessionmaker[Session], verification_id: int, *, actor: str, settings: VerificationSettings | None = None
) -> list[int]:
    """Queue a re-analysis of every later analysed follow-up (each supersedes that series' latest job); recorded on
    the verification. With ``reanalyse_later = "operator"`` (and no operator asking) nothing is queued."""
    with session_scope(sf) as s:
        v = s.get(TimepointVerification, verification_id)
        if v is None:
            raise VerificationError(f"no verification {verification_id}")
        later = later_analysed_series(s, v.patient_pk, v.series_instance_uid)
        if v.method is VerificationMethod.ANNOTATION:  # only the results made without it
            later = _issued_before(s, later, _arrived(s, v))
        if settings is not None and settings.reanalyse_later == "operator":
            audit(s, actor, "verification.reanalysis_waiting", "verification", v.id, series=later)
            return []
        if v.method is VerificationMethod.ANNOTATION:
            reason = f"re-analysis: {v.reason or 'an annotation'} (annotation {verification_id})"
        else:
            reason = (
                f"re-analysis: an earlier timepoint ({v.series_instance_uid}) was verified by {v.verified_by} "
                f"(verification {verification_id})"
            )
        latest = {u: j.id if (j := _latest_job(s, u)) is not None else None for u in later}
    jobs = JobStore(sf, actor=actor)
    created = [jobs.create(u, reason=reason, actor=actor, supersedes=latest[u]) for u in later]
    with session_scope(sf) as s:
        v = s.get(TimepointVerification, verification_id)
        if v is not None:
            v.reanalysis_jobs = [*(v.reanalysis_jobs or []), *created]
            audit(s, actor, "verification.reanalysis", "verification", v.id, jobs=created, series=later)
    return created


def _drawn_prior_seg_on(session: Session, series_uid: str) -> bool:
    """Did LesionTrack issue a SEG of lesions derived from a radiologist's drawing on this (prior) CT series."""
    patient_pk = _patient_of(session, series_uid)
    return patient_pk is not None and earlier_drawn_prior_seg(session, patient_pk, series_uid) is not None


def our_seg_of_series(session: Session, series_uid: str, before_job: int | None = None) -> str | None:
    """Path of the newest SEG of ours for a CT series (what a reader saw and corrected)."""
    q = select(AnalysisJob).where(AnalysisJob.followup_series_uid == series_uid).order_by(AnalysisJob.id.desc())
    for job in session.scalars(q):
        if before_job is not None and job.id == before_job:
            continue
        out = read_output(job.step_outputs or {}, WriteSegSrOutput)
        if out is not None and out.seg and Path(out.seg).is_file():
            return out.seg
    return None


def verify_as_is(sf: sessionmaker[Session], series_uid: str, *, operator: str) -> tuple[int, list[int]]:
    """An operator accepts our latest result of ``series_uid`` unchanged; later follow-ups are re-analysed from it.
    Returns (verification id, re-analysis jobs)."""
    with session_scope(sf) as s:
        if not analysed(s, series_uid):
            raise VerificationError(f"series {series_uid} was not analysed by LesionTrack")
        job = _latest_job(s, series_uid)
        out = read_output(job.step_outputs or {}, WriteSegSrOutput) if job is not None else None
        if job is None or job.state is not JobState.DONE or out is None or not out.seg_sop_instance_uid:
            raise VerificationError(f"series {series_uid} has no finished result with a SEG to verify")
        known = s.scalar(
            select(TimepointVerification).where(
                TimepointVerification.source_sop_instance_uid == out.seg_sop_instance_uid
            )
        )
        if known is not None:
            return known.id, []
        patient_pk = _patient_of(s, series_uid)
        if patient_pk is None:
            raise VerificationError(f"series {series_uid} has no patient")
        v = TimepointVerification(
            patient_pk=patient_pk,
            series_instance_uid=series_uid,
            method=VerificationMethod.AS_IS,
            source_sop_instance_uid=out.seg_sop_instance_uid,
            source_file=out.seg,
            source_manufacturer=OUR_MANUFACTURER,
            verified_by=operator[:128],
            state=VerificationState.APPLIED,
            job_pk=job.id,
        )
        s.add(v)
        s.flush()
        audit(s, operator, "verification.as_is", "verification", v.id, series_uid=series_uid, job_id=job.id)
        vid = v.id
    return vid, reanalyse_later(sf, vid, actor=operator)
