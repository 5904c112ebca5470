"""Step 6: look for new lesions in the follow-up — focal findings not in the registered prior, away from tracked
lesions — and bring back the candidates operators decided on earlier (confirmed → tracked as new lesions,
rejected → kept out of the search)."""

from __future__ import annotations

import numpy as np
from pydicom.uid import generate_uid

from lesiontrack.db.models import CandidateState
from lesiontrack.models.detection.new_lesions import DetectionOptions, search_new_lesions
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.prompts import LesionIdentity
from lesiontrack.pipeline.jobs.candidates import CandidateView, candidate_name, confirmed_name, decided_masks
from lesiontrack.pipeline.jobs.contract import Candidate, CandidateRecord, CandidateSearch, DetectOutput
from lesiontrack.pipeline.jobs.steps.services import Ctx
from lesiontrack.pipeline.jobs.store import PermanentError
from lesiontrack.pipeline.science.lesions import LesionStatus, TrackedLesion

DETECTOR_NAME = "subtraction"
DETECTOR_VERSION = "2.0"  # 2.0 (issue 29): anatomy (lungs, bowel gas, solid organs, liver) and the misfit test
READER = "reader"  # a verified timepoint: the reader looked for new lesions


def detect_new_lesions_step(ctx: Ctx) -> DetectOutput:

    cfg = ctx.services.settings.detection
    inputs = ctx.state.need_inputs()
    followup = ctx.state.need_timepoints()[1]
    if ctx.state.adoption is not None:  # the reader's correction states this timepoint's lesions, new ones included
        by = ctx.state.adoption.verification.verified_by
        ctx.state.search = CandidateSearch(True, READER, "")
        return DetectOutput(ran=True, detector=READER, note=f"new lesions assessed by {by} (verified timepoint)")
    views, masks = decided_masks(ctx.services.session_factory, ctx.series_uid)
    added, rejected = _bring_back_decisions(followup.lesions, followup.ct, views, masks)
    if not cfg.new_lesions:
        ctx.state.search = CandidateSearch(False)
        return DetectOutput(ran=False, note="detection.new_lesions is off", confirmed_added=added)
    warped_prior = ctx.state.need_registration().warp_image(inputs.prior_ct)
    tracked = np.zeros(followup.ct.shape, bool)
    for les in followup.lesions:
        tracked |= les.mask.array.astype(bool)
    for m in rejected:
        tracked |= m
    result = search_new_lesions(
        followup.ct,
        warped_prior,
        tracked,
        DetectionOptions(
            min_diameter_mm=cfg.min_diameter_mm,
            min_confidence=cfg.min_confidence,
            max_residual_fraction=cfg.max_residual_fraction,
            max_candidates=cfg.max_candidates,
        ),
    )
    if not result.trusted:  # misregistration would be reported as new lesions: say the search was not possible
        ctx.state.search = CandidateSearch(False)
        note = (
            f"new-lesion search not trusted: {result.residual_fraction:.1%} of the searched tissue differs from the "
            f"registered prior (> detection.max_residual_fraction {cfg.max_residual_fraction:.1%}); "
            "new lesions not assessed"
        )
        return DetectOutput(ran=False, note=note, confirmed_added=added, residual_fraction=result.residual_fraction)
    found = result.candidates
    candidates = []
    for i, f in enumerate(found, start=1):
        record = CandidateRecord(
            tracking_uid=generate_uid(entropy_srcs=[ctx.series_uid, str(ctx.job_id), "candidate", str(i)]),
            tracking_id=candidate_name(i, f.tissue),
            tissue=f.tissue,
            centre_mm=(float(f.centre_mm[0]), float(f.centre_mm[1]), float(f.centre_mm[2])),
            volume_mm3=float(f.volume_mm3),
            diameter_mm=float(f.diameter_mm),
            confidence=float(f.confidence),
            reasons=list(f.reasons),
        )
        candidates.append(
            Candidate(record, followup.ct.with_array(f.mask.astype(np.uint8)), float(f.mean_hu), float(f.contrast_hu))
        )
    ctx.state.search = CandidateSearch(True, DETECTOR_NAME, DETECTOR_VERSION, candidates)
    return DetectOutput(
        ran=True,
        detector=DETECTOR_NAME,
        version=DETECTOR_VERSION,
        candidates=[c.record for c in candidates],
        confirmed_added=added,
        rejected_excluded=len(rejected),
        residual_fraction=result.residual_fraction,
    )


def _bring_back_decisions(
    lesions: list[TrackedLesion], ct: Volume, views: list[CandidateView], masks: list[np.ndarray]
) -> tuple[list[str], list[np.ndarray]]:
    """Confirmed candidates join the follow-up's lesions (status new); rejected ones are returned as exclusions."""
    tracked = {les.identity.tracking_uid for les in lesions}
    next_label = max((les.identity.label for les in lesions), default=0) + 1
    added: list[str] = []
    rejected: list[np.ndarray] = []
    for view, mask in zip(views, masks, strict=True):
        if mask.shape != ct.shape:
            raise PermanentError(
                f"the mask of candidate {view.tracking_id} ({mask.shape}) does not fit series grid {ct.shape}"
            )
        if view.state is CandidateState.REJECTED:
            rejected.append(mask)
            continue
        if view.tracking_uid in tracked:
            continue
        tracking_id = confirmed_name(view.tracking_id, view.tissue)
        ident = LesionIdentity(view.tracking_uid, tracking_id, next_label, anatomic_site=view.tissue)
        next_label += 1
        lesions.append(
            TrackedLesion(
                ident,
                LesionStatus.NEW,
                ct.with_array(mask.astype(np.uint8)),
                engine=DETECTOR_NAME,
                notes=[f"new lesion confirmed by {view.decided_by}"],
            )
        )
        added.append(view.tracking_uid)
    return added, rejected
