"""Adopting a reader's correction of a follow-up inside the analysis job (issue 16).

* :func:`build_adoption` (load_volumes): read the correction (SEG or TID 1500 SR) and our SEG the reader saw on the
  follow-up grid and match them (:mod:`pipeline.science.correction_matching`): which lesion each corrected segment is,
  what
  was added, deleted, which of our candidates were kept.
* :func:`adopt` (track): the follow-up's lesions become the reader's; lesions the reader added are propagated
  *back* to the prior (any direction, LinGuinE) to tell a new lesion (not visible before) from one that was missed.
* :func:`with_verified_identities` (load_volumes of a later follow-up): prompts read from a verified correction
  carry the identities recorded when it was adopted, so a viewer that dropped our Tracking UIDs keeps the lesions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session

from lesiontrack.db.models import CandidateState, Lesion, NewLesionCandidate, TimepointVerification, VerificationState
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.registration.base import Registration, RegistrationEngine
from lesiontrack.models.segmentation.base import SegmentationEngine
from lesiontrack.models.segmentation.prompts import Prompt
from lesiontrack.models.segmentation.rasterize import prompt_to_mask
from lesiontrack.pipeline.dicom.prompt_sources import PromptSourceError, prompts_from_seg, prompts_from_sr
from lesiontrack.pipeline.dicom.seg.reader import SEG_SOP_CLASSES
from lesiontrack.pipeline.jobs.candidates import confirmed_name
from lesiontrack.pipeline.jobs.contract import Adoption, VerificationRecord
from lesiontrack.pipeline.jobs.store import PermanentError
from lesiontrack.pipeline.science.correction_matching import MatchedBy, SegmentOfInterest, match_correction
from lesiontrack.pipeline.science.lesions import LesionStatus, Timepoint
from lesiontrack.pipeline.science.tracking import Confirmed, RegistrationCache, track_lesions


def _read_prompts(path: Path, ct: Volume) -> list[Prompt]:

    try:
        sop = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID)
        return list(prompts_from_seg(path, ct) if sop in SEG_SOP_CLASSES else prompts_from_sr(path, ct))
    except (PromptSourceError, ValueError, OSError) as exc:
        raise PermanentError(f"correction {path}: {exc}") from exc


def _segments(prompts: Sequence[Prompt], ct: Volume, candidates: set[str]) -> list[SegmentOfInterest]:
    out = []
    for n, p in enumerate(prompts, start=1):
        ident = p.identity
        mask = p.mask if p.mask is not None else prompt_to_mask(p, ct)
        out.append(
            SegmentOfInterest(
                int(p.meta.get("segment_number", n)),
                ident.tracking_uid,
                ident.tracking_id,
                str(p.meta.get("segment_label") or ident.tracking_id),
                mask,
                candidate=ident.tracking_uid in candidates,
                identified=bool(p.meta.get("tracking_from_file", True)),
            )
        )
    return out


def build_adoption(
    session: Session,
    series_uid: str,
    record: VerificationRecord,
    followup_ct: Volume,
    our_seg: str | None,
    prior_prompts: Sequence[Prompt],
    min_dice: float,
) -> Adoption:
    """Match the correction against our SEG of the follow-up (the one the reader corrected)."""
    corrected = _read_prompts(Path(record.source_file), followup_ct)
    if not corrected:
        raise PermanentError(f"correction {record.source_sop_instance_uid} marks no lesion")
    ours_prompts = _read_prompts(Path(our_seg), followup_ct) if our_seg else []
    candidate_uids = set(
        session.scalars(
            select(NewLesionCandidate.tracking_uid).where(NewLesionCandidate.series_instance_uid == series_uid)
        )
    )  # our unconfirmed candidates on this follow-up (segments of our SEG that are not tracked lesions)
    match = match_correction(
        _segments(corrected, followup_ct, set()), _segments(ours_prompts, followup_ct, candidate_uids), min_dice
    )
    label_of = {p.identity.tracking_uid: p.identity.label for p in prior_prompts}
    next_label = max([*label_of.values(), 0]) + 1
    prompts = []
    for p, m in zip(corrected, match.matches, strict=True):
        label = label_of.get(m.tracking_uid)
        if label is None:
            label, next_label = next_label, next_label + 1
        tracking_id = m.tracking_id
        if m.was_candidate:
            tracking_id = confirmed_name(tracking_id)
        ident = replace(p.identity, tracking_uid=m.tracking_uid, tracking_id=tracking_id, label=label)
        prompts.append(
            replace(
                p,
                identity=ident,
                source=f"correction {record.source_sop_instance_uid} by {record.verified_by}",
                meta={**p.meta, "sop_instance_uid": record.source_sop_instance_uid, "matched_by": m.matched_by.value},
            )
        )
    return Adoption(
        record,
        prompts,
        match.matches,
        [o.tracking_uid for o in match.deleted],
        [m.tracking_uid for m in match.matches if m.was_candidate],
        [o.tracking_uid for o in match.dropped_candidates],
    )


def adopt(
    adoption: Adoption,
    tps: list[Timepoint],
    prior_prompts: Sequence[Prompt],
    registration: Registration,
    engine: RegistrationEngine,
    segmentation: SegmentationEngine,
) -> None:
    """Fill ``tps`` (prior, follow-up): the prior from its annotation, the follow-up with the reader's lesions."""
    deleted = set(adoption.deleted)
    base = [p for p in prior_prompts if p.identity.tracking_uid not in deleted]
    both = RegistrationCache.known(registration, tps[0], tps[1], engine)
    track_lesions(
        tps,
        base,
        source_index=0,
        registration=both,
        segmentation=segmentation,
        confirmed=Confirmed({1: adoption.prompts}),
    )
    by = adoption.verification.verified_by
    how = {m.tracking_uid: m for m in adoption.matches}
    for les in tps[1].lesions:
        m = how.get(les.identity.tracking_uid)
        les.meta["verified"] = True
        les.meta["verification_id"] = adoption.verification.id
        les.engine = "reader"
        les.notes.append(f"verified by {by} (matched by {m.matched_by.value if m else 'tracking_uid'})")
        if m is not None and m.was_candidate:
            les.status = LesionStatus.NEW
            les.notes.append(f"new-lesion candidate kept by {by}: confirmed")
    added = [p for p in adoption.prompts if how[p.identity.tracking_uid].matched_by is MatchedBy.ADDED]
    if not added:
        return
    back = [Timepoint(tp.series_uid, tp.ct, tp.study_date, tp.study_uid) for tp in tps]
    track_lesions(back, added, source_index=1, registration=both, segmentation=segmentation)
    at_prior = {les.identity.tracking_uid: les for les in back[0].lesions}
    for les in tps[1].lesions:
        uid = les.identity.tracking_uid
        if uid not in at_prior:
            continue
        les.meta["added_by_reader"] = True
        before = at_prior[uid]
        if before.status is LesionStatus.PRESENT:
            les.notes.append(f"added by {by}; propagated back, already visible at the prior: a lesion missed before")
            before.notes.append(f"found by propagating back the lesion {by} added at the follow-up")
            before.meta["retrospective"] = True
            tps[0].lesions.append(before)
        else:
            les.status = LesionStatus.NEW
            les.notes.append(f"added by {by}; propagated back, not visible at the prior: a new lesion")


def with_verified_identities(session: Session, sop_uid: str, prompts: list[Prompt]) -> list[Prompt]:
    """Prompts of a verified correction with the lesion identities its adoption recorded (segment → lesion)."""
    v = session.scalar(
        select(TimepointVerification).where(
            TimepointVerification.source_sop_instance_uid == sop_uid,
            TimepointVerification.state == VerificationState.APPLIED,
        )
    )
    if v is None or not v.matches:
        return prompts
    by_number = {int(str(m["segment_number"])): m for m in v.matches if isinstance(m, dict)}
    out = []
    for n, p in enumerate(prompts, start=1):
        m = by_number.get(int(p.meta.get("segment_number", n)))
        if m is None:
            out.append(p)
            continue
        ident = replace(p.identity, tracking_uid=str(m["tracking_uid"]), tracking_id=str(m["tracking_id"]))
        out.append(replace(p, identity=ident))
    return out


def retired_lesions(session: Session, patient_pk: int | None) -> set[str]:
    """Tracking UIDs of this patient's lesions a reader deleted (not tracked any more)."""
    if patient_pk is None:
        return set()
    rows = session.scalars(
        select(Lesion.tracking_uid).where(Lesion.patient_pk == patient_pk, Lesion.retired_at_series_uid.is_not(None))
    )
    return set(rows)


def candidate_decisions(adoption: Adoption) -> dict[str, CandidateState]:
    """What the reader's correction says about our unconfirmed candidates."""
    out = {uid: CandidateState.CONFIRMED for uid in adoption.kept_candidates}
    out.update({uid: CandidateState.REJECTED for uid in adoption.dropped_candidates})
    return out
