"""Persistence of a job's results: lesions and their observations, the baseline target choice, our own objects.

Idempotent by construction: a re-run replaces this job's observation rows only; a lesion is created once per
Tracking UID; the baseline's target / non-target choice is stored once in ``Lesion.is_target`` and never changed
by later jobs; our SEG/SR files are recorded once per SOP Instance UID.
"""

from __future__ import annotations

import hashlib
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.filereader import _read_file_meta_info, read_preamble
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.db.models import (
    CandidateState,
    Instance,
    Lesion,
    LesionObservation,
    LesionOrigin,
    NewLesionCandidate,
    NewLesionSearchRun,
    RoutingDecision,
    Series,
    SeriesState,
    TimepointVerification,
    VerificationState,
)
from lesiontrack.db.repository import audit, get_or_create_patient, get_or_create_series, get_or_create_study
from lesiontrack.db.session import session_scope
from lesiontrack.pipeline.jobs.adoption import candidate_decisions
from lesiontrack.pipeline.jobs.candidates import save_mask
from lesiontrack.pipeline.jobs.contract import MatchPriorsOutput
from lesiontrack.pipeline.jobs.ports import PROMPT_FILE
from lesiontrack.pipeline.jobs.steps.services import Ctx
from lesiontrack.pipeline.jobs.store import PermanentError, utcnow
from lesiontrack.pipeline.science.confidence import lesion_confidence
from lesiontrack.pipeline.science.lesions import LesionStatus, TrackedLesion
from lesiontrack.pipeline.science.recist import RecistRole

_ORIGIN_OF = {
    "SEG": LesionOrigin.SEG,
    "SR": LesionOrigin.SR,
    "PR": LesionOrigin.GSPS,
    "GSPS": LesionOrigin.GSPS,
    "RTSTRUCT": LesionOrigin.RTSTRUCT,
    PROMPT_FILE: LesionOrigin.PROMPT,
}
"""Where a lesion first tracked from an annotation came from, by the object its prompt was read from
(``meta["prompt_object"]``, else the prior annotation's modality)."""


def persist_observations(ctx: Ctx, seg_uid: str | None, segment_numbers: dict[str, int]) -> None:
    """Lesions (by Tracking UID) and this job's observations of them; a re-run replaces this job's rows only."""
    fu = ctx.outputs.get(MatchPriorsOutput).followup
    measured = ctx.state.need_measured()
    patient_pk = fu.patient_pk
    if patient_pk is None:
        raise PermanentError(f"series {ctx.series_uid} has no patient")
    with session_scope(ctx.services.session_factory) as s:
        s.execute(delete(LesionObservation).where(LesionObservation.job_pk == ctx.job_id))
        _supersede_earlier(s, ctx)
        for series_uid, thickness in measured.slice_thickness_mm.items():
            series = s.scalar(select(Series).where(Series.series_instance_uid == series_uid))
            if series is not None and series.slice_thickness_mm is None:
                series.slice_thickness_mm = thickness
        for tp_index, tp in enumerate(ctx.state.need_timepoints()):
            for les in tp.lesions:
                lesion_pk = _lesion(s, ctx, les, patient_pk)
                if tp_index == 0:
                    known = s.scalar(
                        select(LesionObservation.id).where(
                            LesionObservation.lesion_pk == lesion_pk,
                            LesionObservation.series_instance_uid == tp.series_uid,
                        )
                    )
                    if known is not None:
                        continue  # the prior was measured already (by the job that analysed it)
                s.add(_observation(ctx, les, lesion_pk, tp_index, tp.series_uid, seg_uid, segment_numbers))


def _supersede_earlier(s: Session, ctx: Ctx) -> None:
    """Our earlier results of this series are kept for the audit trail but no longer reported."""
    adoption = ctx.state.adoption
    superseded = s.execute(  # type: ignore[attr-defined]  # an UPDATE's CursorResult has rowcount
        update(LesionObservation)
        .where(
            LesionObservation.series_instance_uid == ctx.series_uid,
            LesionObservation.superseded_by_job.is_(None),
        )
        .values(superseded_by_job=ctx.job_id)
    ).rowcount
    if superseded:
        audit(
            s,
            ctx.worker,
            "observations.superseded",
            "series",
            ctx.series_uid,
            count=superseded,
            by_job=ctx.job_id,
            verification=adoption.verification.id if adoption is not None else None,
        )


def _lesion(s: Session, ctx: Ctx, les: TrackedLesion, patient_pk: int) -> int:
    """The lesion's row (created on first sight, its RECIST role set once, at baseline); its primary key."""
    prior = ctx.state.need_inputs().prior
    adoption = ctx.state.adoption
    ident = les.identity
    lesion = s.scalar(select(Lesion).where(Lesion.tracking_uid == ident.tracking_uid))
    added = bool(les.meta.get("added_by_reader"))
    if lesion is None:
        origin = (
            LesionOrigin.NEW
            if les.status is LesionStatus.NEW
            else LesionOrigin.ADDED
            if added
            else _ORIGIN_OF.get(str(les.meta.get("prompt_object") or prior.annotations[0].modality), LesionOrigin.SR)
        )
        lesion = Lesion(
            tracking_uid=ident.tracking_uid,
            tracking_id=ident.tracking_id,
            patient_pk=patient_pk,
            anatomic_site=ident.anatomic_site,
            origin=origin,
            origin_series_uid=ctx.series_uid if added or adoption is not None else prior.ct_series_uid,
            is_target=False if origin is LesionOrigin.ADDED else None,  # targets are chosen at baseline
        )
        s.add(lesion)
        s.flush()
        audit(s, ctx.worker, "lesion.created", "lesion", lesion.id, tracking_uid=ident.tracking_uid, job_id=ctx.job_id)
    role = ctx.state.need_measured().recist.selection.role_of(ident.tracking_uid)
    if lesion.is_target is None and role in (RecistRole.TARGET, RecistRole.NON_TARGET):
        lesion.is_target = role is RecistRole.TARGET  # chosen once, at baseline; later jobs keep it
        audit(s, ctx.worker, "lesion.role", "lesion", lesion.id, role=role, job_id=ctx.job_id)
    return lesion.id


def _observation(
    ctx: Ctx,
    les: TrackedLesion,
    lesion_pk: int,
    tp_index: int,
    series_uid: str,
    seg_uid: str | None,
    segment_numbers: dict[str, int],
) -> LesionObservation:
    """This job's observation of one lesion at the prior (``tp_index`` 0) or the follow-up (1)."""
    measured = ctx.state.need_measured()
    prior = ctx.state.need_inputs().prior
    annotation = prior.annotations[0]
    adoption = ctx.state.adoption
    rec = measured.recist
    ident = les.identity
    m = (measured.prior if tp_index == 0 else measured.current)[ident.tracking_uid]
    changes = measured.changes.get(ident.tracking_uid) if tp_index == 1 else None
    from_sop, from_series = annotation.sop_instance_uid, prior.ct_series_uid
    verified = adoption is not None and (tp_index == 1 or bool(les.meta.get("retrospective")))
    if verified and adoption is not None:  # the reader's own segmentation of this follow-up
        from_sop, from_series = adoption.verification.source_sop_instance_uid, ctx.series_uid
    role = rec.selection.role_of(ident.tracking_uid)
    recist_entry: dict[str, object] = {"role": role}
    if tp_index == 1:
        recist_entry["overall_response"] = rec.timepoints[measured.timepoint_index].overall_response.value
    data: dict[str, object] = {**m.to_dict(), "recist": recist_entry}  # the measurement, with what it stands in
    if changes is not None:
        data["changes"] = changes.to_dict()
    conf = lesion_confidence(les) if tp_index == 1 else None
    if conf is not None:
        data["confidence"] = conf.model_dump()
    return LesionObservation(
        lesion_pk=lesion_pk,
        series_instance_uid=series_uid,
        job_pk=ctx.job_id,
        seg_sop_instance_uid=seg_uid if tp_index == 1 else annotation.sop_instance_uid,
        segment_number=segment_numbers.get(ident.tracking_uid) if tp_index == 1 else None,
        volume_mm3=m.volume_mm3,
        long_axis_mm=m.long_axis_mm,
        short_axis_mm=m.short_axis_mm,
        centre_x_mm=m.centre_mm[0] if m.centre_mm else None,
        centre_y_mm=m.centre_mm[1] if m.centre_mm else None,
        centre_z_mm=m.centre_mm[2] if m.centre_mm else None,
        status=les.status,
        engine=les.engine or None,
        engine_version=(les.engine_version or None),
        measurements=data,
        propagated_from_series_uid=from_series if tp_index == 1 or verified else None,
        propagated_from_sop_uid=from_sop if tp_index == 1 or verified else None,
        verification_pk=adoption.verification.id if verified and adoption is not None else None,
        confidence=None if conf is None else conf.confidence,
        review=bool(les.meta.get("review", False)) if tp_index == 1 else False,
        review_reasons=None if conf is None else list(conf.reasons),
    )


def persist_verification(ctx: Ctx) -> int | None:
    """A reader's correction adopted by this job: lesions the reader deleted are retired, our candidates kept or
    dropped are confirmed or rejected, the verification is applied (matches recorded). Returns the verification id
    when later follow-ups still have to be re-analysed from it."""

    adoption = ctx.state.adoption
    if adoption is None:
        return None
    v = adoption.verification
    with session_scope(ctx.services.session_factory) as s:
        for uid in adoption.deleted:
            lesion = s.scalar(select(Lesion).where(Lesion.tracking_uid == uid))
            if lesion is not None and lesion.retired_at_series_uid is None:
                lesion.retired_at_series_uid = ctx.series_uid
                lesion.retired_by = v.verified_by[:128]
                audit(s, ctx.worker, "lesion.retired", "lesion", lesion.id, by=v.verified_by, verification=v.id)
        for uid, state in candidate_decisions(adoption).items():
            for c in s.scalars(select(NewLesionCandidate).where(NewLesionCandidate.tracking_uid == uid)):
                if c.state is CandidateState.UNCONFIRMED:
                    c.state, c.decided_by, c.decided_at = state, v.verified_by[:128], utcnow()
                    audit(s, v.verified_by, f"candidate.{state.value}", "candidate", c.id, verification=v.id)
        row = s.get(TimepointVerification, v.id)
        if row is None:
            raise PermanentError(f"verification {v.id} disappeared")
        first = row.state is not VerificationState.APPLIED
        row.state = VerificationState.APPLIED
        row.job_pk = ctx.job_id
        row.matches = [m.to_dict() for m in adoption.matches]
        if first:
            audit(
                s,
                ctx.worker,
                "verification.applied",
                "verification",
                v.id,
                job_id=ctx.job_id,
                matches=row.matches,
                deleted=adoption.deleted,
            )
        return v.id if not row.reanalysis_jobs else None


def persist_search(ctx: Ctx, seg_uid: str | None, segment_numbers: dict[str, int], out_dir: Path) -> None:
    """This job's new-lesion search (that it ran) and its candidates with their masks; a re-run replaces them."""
    search = ctx.state.need_search()
    fu = ctx.outputs.get(MatchPriorsOutput).followup
    if fu.patient_pk is None:
        raise PermanentError(f"series {ctx.series_uid} has no patient")
    with session_scope(ctx.services.session_factory) as s:
        old_runs = select(NewLesionSearchRun.id).where(NewLesionSearchRun.job_pk == ctx.job_id)
        s.execute(delete(NewLesionCandidate).where(NewLesionCandidate.search_pk.in_(old_runs)))
        s.execute(delete(NewLesionSearchRun).where(NewLesionSearchRun.job_pk == ctx.job_id))
        if not search.ran:
            return
        run = NewLesionSearchRun(
            series_instance_uid=ctx.series_uid,
            job_pk=ctx.job_id,
            detector=search.detector,
            detector_version=search.version,
            candidates_found=len(search.candidates),
        )
        s.add(run)
        s.flush()
        mask_dir = out_dir / "candidates"
        mask_dir.mkdir(parents=True, exist_ok=True)
        for c in search.candidates:
            r = c.record
            mask_path = mask_dir / f"{r.tracking_uid}.npz"
            save_mask(mask_path, c.mask.array.astype(bool))
            s.add(
                NewLesionCandidate(
                    search_pk=run.id,
                    patient_pk=fu.patient_pk,
                    series_instance_uid=ctx.series_uid,
                    tracking_uid=r.tracking_uid,
                    tracking_id=r.tracking_id,
                    tissue=r.tissue,
                    centre_x_mm=r.centre_mm[0],
                    centre_y_mm=r.centre_mm[1],
                    centre_z_mm=r.centre_mm[2],
                    volume_mm3=r.volume_mm3,
                    diameter_mm=r.diameter_mm,
                    mean_hu=c.mean_hu,
                    contrast_hu=c.contrast_hu,
                    confidence=r.confidence,
                    reasons=list(r.reasons),
                    mask_path=str(mask_path),
                    seg_sop_instance_uid=seg_uid,
                    segment_number=segment_numbers.get(r.tracking_uid),
                    state=CandidateState.UNCONFIRMED,
                )
            )


def record_our_objects(sf: sessionmaker[Session], files: list[Path]) -> None:
    """Our SEG/SR become local instances too (so the next follow-up finds them as priors), marked as ours."""

    with session_scope(sf) as s:
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            patient = get_or_create_patient(s, str(ds.get("PatientID", "")), ds.get("IssuerOfPatientID") or None)
            study = get_or_create_study(
                s, patient, str(ds.StudyInstanceUID), study_date=ds.get("StudyDate"), study_time=ds.get("StudyTime")
            )
            series = get_or_create_series(
                s,
                study,
                str(ds.SeriesInstanceUID),
                modality=str(ds.Modality),
                series_number=int(ds.get("SeriesNumber") or 0) or None,
                series_description=str(ds.get("SeriesDescription", ""))[:64] or None,
            )
            series.created_by_us = True
            series.state = SeriesState.COMPLETE
            series.routing_decision = RoutingDecision.SKIP
            series.routing_reason = "created by LesionTrack"
            if s.scalar(select(Instance.id).where(Instance.sop_instance_uid == str(ds.SOPInstanceUID))) is None:
                data = Path(f).read_bytes()
                s.add(
                    Instance(
                        sop_instance_uid=str(ds.SOPInstanceUID),
                        sop_class_uid=str(ds.SOPClassUID),
                        series_pk=series.id,
                        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                        file_path=str(f),
                        size_bytes=len(data),
                        sha256=dataset_sha256(data),
                        instance_number=int(ds.get("InstanceNumber") or 1),
                    )
                )
                series.instance_count = (series.instance_count or 0) + 1


def dataset_sha256(part10: bytes) -> str:
    """SHA-256 of the dataset after the file meta — what the SCP records for a received instance, so our own
    SEG/SR coming back from the PACS (e.g. with a prior retrieval) is recognised as the same bytes."""

    fp = BytesIO(part10)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return hashlib.sha256(part10[fp.tell() :]).hexdigest()
