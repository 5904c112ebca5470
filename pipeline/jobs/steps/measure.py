"""Step 6: measure every lesion on the follow-up and assess RECIST 1.1 over the patient history.

The history (:mod:`pipeline.views.history`) is the one the dashboard, API and exports read, with this job's prior and
follow-up measurements added as pending timepoints — so the SR reports exactly what they will show.
"""

from __future__ import annotations

from lesiontrack.db.session import session_scope
from lesiontrack.pipeline.jobs.contract import (
    MatchPriorsOutput,
    Measured,
    MeasuredLesion,
    MeasureOutput,
    RecistRecord,
    TimepointRef,
)
from lesiontrack.pipeline.jobs.steps.services import Ctx, time_key
from lesiontrack.pipeline.jobs.store import PermanentError
from lesiontrack.pipeline.science.confidence import lesion_confidence
from lesiontrack.pipeline.science.lesions import Timepoint
from lesiontrack.pipeline.science.measurements import LesionMeasurement, measure_lesion
from lesiontrack.pipeline.science.recist import NewLesionSearch, RecistRules
from lesiontrack.pipeline.views.history import PendingTimepoint, ReviewFlag, build_timeline


def measure_timepoint(tp: Timepoint) -> dict[str, LesionMeasurement]:
    """Every lesion of one timepoint measured (by Tracking UID)."""
    out = {}
    for les in tp.lesions:
        ident = les.identity
        out[ident.tracking_uid] = measure_lesion(
            les.mask,
            tp.ct,
            tracking_uid=ident.tracking_uid,
            tracking_id=ident.tracking_id,
            is_node=ident.is_node,
            status=les.status,
            series_uid=tp.series_uid,
            anatomic_site=ident.anatomic_site,
        )
    return out


def _review_flags(tp: Timepoint) -> dict[str, ReviewFlag]:
    """Tracking UID → the confidence / review flag the track step put on each lesion of ``tp``."""
    out = {}
    for les in tp.lesions:
        conf = lesion_confidence(les)
        out[les.identity.tracking_uid] = ReviewFlag(
            None if conf is None else conf.confidence,
            bool(les.meta.get("review", False)),
            () if conf is None else tuple(conf.reasons),
        )
    return out


def measure(ctx: Ctx) -> MeasureOutput:
    fu = ctx.outputs.get(MatchPriorsOutput).followup
    if fu.patient_pk is None:
        raise PermanentError(f"series {ctx.series_uid} has no patient")
    inputs = ctx.state.need_inputs()
    prior_tp, followup_tp = ctx.state.need_timepoints()
    search = ctx.state.need_search()
    prior = inputs.prior
    prior_meas = measure_timepoint(prior_tp)
    current = measure_timepoint(followup_tp)
    thickness = {
        prior.ct_series_uid: float(inputs.prior_ct.spacing[2]),
        ctx.series_uid: float(inputs.followup_ct.spacing[2]),
    }
    pending = [
        PendingTimepoint(
            prior.ct_series_uid,
            prior.study_uid,
            prior.study_date,
            prior.study_time,
            thickness[prior.ct_series_uid],
            list(prior_meas.values()),
            replace=False,  # the prior was measured already by the job that analysed it
        ),
        PendingTimepoint(
            ctx.series_uid,
            fu.study_uid,
            fu.study_date,
            fu.study_time,
            thickness[ctx.series_uid],
            list(current.values()),
            search=NewLesionSearch(search.ran, len(search.candidates)),
            reviews=_review_flags(followup_tp),
        ),
    ]
    with session_scope(ctx.services.session_factory) as s:
        history = build_timeline(
            s,
            fu.patient_pk,
            RecistRules.from_settings(ctx.services.settings.recist),
            pending=pending,
            until_series_uid=ctx.series_uid,
        )
    if history.assessment is None:
        raise PermanentError(f"RECIST assessment failed: {history.recist_error or 'no lesions'}")
    assessment = history.assessment
    index = history.index_of(ctx.series_uid)
    all_changes = history.changes_at(index)
    changes = {uid: all_changes.get(uid) for uid in current}
    ctx.state.measured = Measured(current, prior_meas, changes, assessment, index, thickness)
    return MeasureOutput(
        timepoints=[
            TimepointRef(key=time_key(tp.study_date, tp.study_time), series_uid=tp.series_uid)
            for tp in history.timepoints
        ],
        lesions=[MeasuredLesion(measurement=m, changes=changes[u]) for u, m in current.items()],
        recist=RecistRecord.of(assessment, index),
    )
