"""Step 5: propagate every prior lesion onto the follow-up (tracking loop) and keep lesions that vanished earlier."""

from __future__ import annotations

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.db.models import Lesion, LesionObservation
from lesiontrack.db.session import session_scope
from lesiontrack.db.status import LesionStatus
from lesiontrack.models.engines import build_registration, build_segmentation
from lesiontrack.models.registration.base import Registration
from lesiontrack.models.segmentation.base import SegmentationEngine
from lesiontrack.models.segmentation.prompts import LesionIdentity
from lesiontrack.pipeline.jobs.adoption import adopt
from lesiontrack.pipeline.jobs.contract import MatchPriorsOutput, TrackedLesionRecord, TrackOutput
from lesiontrack.pipeline.jobs.steps.services import Ctx
from lesiontrack.pipeline.science.confidence import ConfidenceRules, LesionConfidence, lesion_confidence
from lesiontrack.pipeline.science.drawn_priors import weaken_for_origin
from lesiontrack.pipeline.science.lesions import Timepoint, TrackedLesion
from lesiontrack.pipeline.science.tracking import Confirmed, RegistrationCache, TrackingOptions, track_lesions


def track(ctx: Ctx) -> TrackOutput:
    eng = ctx.services.settings.engines
    seg = build_segmentation(eng.segmentation, eng, device=ctx.device)  # the registry knows which weights it reads
    inputs = ctx.state.need_inputs()
    registration = ctx.state.need_registration()
    prior = inputs.prior
    fu = ctx.outputs.get(MatchPriorsOutput).followup
    tps = [
        Timepoint(prior.ct_series_uid, inputs.prior_ct, prior.study_date, prior.study_uid),
        Timepoint(ctx.series_uid, inputs.followup_ct, fu.study_date, fu.study_uid),
    ]
    if ctx.state.adoption is not None:  # a reader's correction of this follow-up is its result (issue 16)
        engine = build_registration(
            eng.registration, eng, device=ctx.device, seed=ctx.services.settings.compute.seed
        )  # only registers when the reader added lesions (propagated back to the prior)
        adopt(ctx.state.adoption, tps, inputs.prompts, registration, engine, seg)
    else:
        _track(ctx, tps, registration, seg)
    if inputs.followup_prompts and ctx.state.adoption is None:
        _weak_here(tps[1], ConfidenceRules.from_settings(ctx.services.settings.tracking))
    tps[1].lesions.extend(vanished_earlier(ctx.services.session_factory, fu.patient_pk, tps, registration))
    ctx.state.timepoints = tps
    return TrackOutput(
        engine=seg.name,
        version=seg.version,
        lesions=[
            TrackedLesionRecord(
                tracking_uid=les.identity.tracking_uid,
                tracking_id=les.identity.tracking_id,
                status=les.status.value,
                notes=list(les.notes),
                confidence=None if (conf := lesion_confidence(les)) is None else conf.confidence,
                review=bool(les.meta.get("review", False)),
                review_reasons=[] if conf is None else list(conf.reasons),
            )
            for les in tps[1].lesions
        ]
        + [  # lesions of the prior that could not be prompts: in every result, not assessed, flagged (issue 29)
            TrackedLesionRecord(
                tracking_uid=g.identity.tracking_uid,
                tracking_id=g.identity.tracking_id,
                status=LesionStatus.NOT_EVALUATED.value,
                notes=[g.reason],
                review=True,
                review_reasons=[g.reason],
            )
            for g in inputs.not_assessed
        ],
    )


def _track(ctx: Ctx, tps: list[Timepoint], registration: Registration, seg: SegmentationEngine) -> None:
    """The tracking loop on (prior, follow-up); the lesions the prior's annotation does not mark are propagated from
    their own nearest earlier annotation (timepoints before the prior, only inside this step: the prior gets them
    too, so their change is measured), the follow-up's own annotations are prompts there (issue 31)."""
    inputs = ctx.state.need_inputs()
    earlier = [Timepoint(e.ct_series_uid, e.ct, e.study_date, e.study_uid) for e in inputs.earlier]
    n = len(earlier)
    confirmed = {i: e.prompts for i, e in enumerate(inputs.earlier)}
    if inputs.followup_prompts:  # a radiologist's lesions on this follow-up: segmented there from the drawing
        confirmed[n + 1] = inputs.followup_prompts
    eng = ctx.services.settings.engines
    cache = RegistrationCache.known(
        registration,
        tps[0],
        tps[1],
        build_registration(eng.registration, eng, device=ctx.device, seed=ctx.services.settings.compute.seed)
        if earlier
        else None,
    )
    track_lesions(
        [*earlier, *tps],
        inputs.prompts,
        source_index=n,
        registration=cache,
        segmentation=seg,
        options=TrackingOptions(
            boosting=ctx.services.settings.tracking.boosting,
            confidence=ConfidenceRules.from_settings(ctx.services.settings.tracking),
        ),
        confirmed=Confirmed(confirmed, partial=True) if confirmed else None,
    )


def _weak_here(tp: Timepoint, rules: ConfidenceRules | None) -> None:
    """A lesion a radiologist marked on this follow-up with a line or an arrow (not a 3-D outline) carries the weak
    prior's confidence there too, and is flagged for review until a person confirms it."""
    for les in tp.lesions:
        if les.meta.get("annotated") and les.meta.get("weak_prior"):
            base = LesionConfidence(confidence=1.0, review=False)
            conf = weaken_for_origin(base, tp.lesions, les.identity.label, rules)
            les.meta["confidence"] = conf
            les.meta["review"] = bool(les.meta.get("review", False) or conf.review)


def vanished_earlier(
    sf: sessionmaker[Session], patient_pk: int | None, tps: list[Timepoint], reg: Registration
) -> list[TrackedLesion]:
    """Lesions of this patient that had vanished before the prior (so our prior SEG has no segment for them):
    they stay in the report as vanished, at their last known position, instead of silently dropping out."""

    if patient_pk is None:
        return []
    tracked = {les.identity.tracking_uid for tp in tps for les in tp.lesions}
    labels = [les.identity.label for tp in tps for les in tp.lesions]
    next_label = max(labels, default=0) + 1
    out = []
    with session_scope(sf) as s:
        for lesion in s.scalars(select(Lesion).where(Lesion.patient_pk == patient_pk).order_by(Lesion.id)):
            if lesion.tracking_uid in tracked or lesion.retired_at_series_uid is not None:
                continue
            obs = s.scalars(
                select(LesionObservation)
                .where(LesionObservation.lesion_pk == lesion.id, LesionObservation.superseded_by_job.is_(None))
                .order_by(LesionObservation.id)
            ).all()
            if not obs or obs[-1].status is not LesionStatus.VANISHED:
                continue
            seen = [o for o in obs if o.centre_x_mm is not None]
            centre = None
            if seen:
                last = np.array([[seen[-1].centre_x_mm, seen[-1].centre_y_mm, seen[-1].centre_z_mm]], float)
                centre = np.asarray(reg.map_points_to_followup(last), float)[0]
            ident = LesionIdentity(
                lesion.tracking_uid, lesion.tracking_id, next_label, anatomic_site=lesion.anatomic_site
            )
            next_label += 1
            empty = tps[1].ct.with_array(np.zeros(tps[1].ct.shape, np.uint8))
            out.append(
                TrackedLesion(
                    ident,
                    LesionStatus.VANISHED,
                    empty,
                    engine="",
                    propagated_centre_mm=centre,
                    notes=["vanished before the prior timepoint; not re-segmented"],
                )
            )
    return out
