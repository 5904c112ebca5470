"""Steps 1–2: find the prior timepoint whose annotation prompts this follow-up, and bring its files to disk."""

from __future__ import annotations

from pathlib import Path

from lesiontrack.db.models import VerificationMethod
from lesiontrack.db.session import session_scope
from lesiontrack.pipeline.jobs.contract import (
    MatchPriorsOutput,
    PriorRecord,
    PriorSummary,
    PromptSourceRecord,
    RetrievePriorsOutput,
    VerificationRecord,
)
from lesiontrack.pipeline.jobs.ports import PriorSource, PriorTimepoint
from lesiontrack.pipeline.jobs.steps.services import Ctx, followup_series, time_key
from lesiontrack.pipeline.jobs.store import NothingToTrack, PermanentError, TransientError
from lesiontrack.pipeline.jobs.verification import VerificationView, verification_for_series, verified_sop_uids
from lesiontrack.pipeline.science.prompt_selection import (
    NoPersonAnnotation,
    is_our_object,
    our_instance_uids,
    select_prior_annotation,
)


def _prior_source(ctx: Ctx) -> PriorSource:
    if ctx.services.prior_source is None:
        raise PermanentError("no prior source configured (dicom_node unavailable)")
    return ctx.services.prior_source


def match_priors(ctx: Ctx) -> MatchPriorsOutput:
    fu = followup_series(ctx.services.session_factory, ctx.series_uid)
    if not fu.files:
        raise PermanentError(f"follow-up series {ctx.series_uid} has no stored instances")
    source_port = _prior_source(ctx)
    try:
        priors = source_port.find_priors(ctx.series_uid)
    except (NothingToTrack, PermanentError):
        raise
    except Exception as exc:  # a query that fails is a PACS/network problem: retry later
        raise TransientError(f"prior lookup failed: {type(exc).__name__}: {exc}") from exc
    fu_key = time_key(fu.record.study_date, fu.record.study_time)
    earlier = [
        p
        for p in priors
        if p.study_uid != fu.record.study_uid
        and p.ct_series_uid != ctx.series_uid
        and time_key(p.study_date, p.study_time) <= fu_key
    ]
    summary = [
        PriorSummary(
            study_uid=p.study_uid,
            study_date=p.study_date,
            ct_series_uid=p.ct_series_uid,
            annotations=[a.modality for a in p.annotations],
            source=p.source,
        )
        for p in earlier
    ]
    if not earlier:
        raise NothingToTrack("no prior study of this patient")
    annotated = [p for p in earlier if p.annotations]
    if not annotated:
        plural = "y" if len(earlier) == 1 else "ies"
        raise NothingToTrack(f"no lesions marked on any of {len(earlier)} prior stud{plural}")

    sf = ctx.services.session_factory
    sop_uids = [a.sop_instance_uid for p in annotated for a in p.annotations]
    with session_scope(sf) as s:  # a result of ours a person verified as is counts as the person's (issue 16)
        verified = verified_sop_uids(s, sop_uids)
        adoption = verification_for_series(s, ctx.series_uid)
    ours = our_instance_uids(sf, sop_uids) - verified
    try:  # the person's annotation nearest in time, never a result of ours (issue 14)
        source, choice = select_prior_annotation(
            annotated,
            fu_key,
            lambda a: (
                a.sop_instance_uid not in verified
                and (a.sop_instance_uid in ours or any(is_our_object(Path(f)) for f in a.files[:1]))
            ),
            lambda p: time_key(p.study_date, p.study_time),
        )
    except NoPersonAnnotation as exc:
        raise NothingToTrack(str(exc)) from exc
    return MatchPriorsOutput(
        followup=fu.record,
        prior=PriorRecord.of(source),
        priors_found=summary,
        prompt_source=PromptSourceRecord(
            reason=choice.reason, skipped_ours=[c.sop_instance_uid for c in choice.skipped]
        ),
        verification=_adoption_record(adoption),
    )


def _adoption_record(v: VerificationView | None) -> VerificationRecord | None:
    """The reader's correction of this follow-up to adopt (an as-is verification keeps our result: nothing to adopt)."""
    if v is None or v.method is not VerificationMethod.CORRECTION or not v.source_file or not v.source_sop_instance_uid:
        return None
    if not Path(v.source_file).is_file():
        raise PermanentError(f"verification {v.id}: the correction file {v.source_file} is gone")
    return VerificationRecord(
        id=v.id,
        method=v.method.value,
        source_sop_instance_uid=v.source_sop_instance_uid,
        source_file=v.source_file,
        verified_by=v.verified_by,
        verified_at=v.verified_at.isoformat(),
    )


def retrieve_priors(ctx: Ctx) -> RetrievePriorsOutput:
    source_port = _prior_source(ctx)
    prior: PriorTimepoint = ctx.outputs.get(MatchPriorsOutput).prior.to_port()
    try:
        filled = source_port.retrieve(prior)
    except Exception as exc:
        raise TransientError(f"retrieving prior study {prior.study_uid} failed: {type(exc).__name__}: {exc}") from exc
    missing = [str(f) for f in filled.ct_files if not Path(f).is_file()]
    if not filled.ct_files or missing:
        raise TransientError(
            f"prior CT series {prior.ct_series_uid} incomplete after retrieval "
            f"({len(filled.ct_files)} files, {len(missing)} missing)"
        )
    for a in filled.annotations:
        if not a.files or not all(Path(f).is_file() for f in a.files):
            raise TransientError(f"prior {a.modality} {a.sop_instance_uid} not retrieved")
    return RetrievePriorsOutput(prior=PriorRecord.of(filled), ct_files=len(filled.ct_files))
