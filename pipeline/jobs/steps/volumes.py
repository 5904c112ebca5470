"""Step 3: read the follow-up and prior CTs and the lesion prompts of the prior's annotation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NoReturn

from lesiontrack.db.session import session_scope
from lesiontrack.models.imaging.dicom_read import SeriesError, read_series
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.prompts import Prompt
from lesiontrack.pipeline.dicom.annotations.common import AnnotationWarning, normalise_label
from lesiontrack.pipeline.dicom.prompt_sources import (
    NoLesionInAnnotation,
    PromptSourceError,
    load_prompts_json,
    prompts_from_object,
    with_prompt_object,
)
from lesiontrack.pipeline.dicom.seg.reader import UnassessedSegment, read_seg_prompts_and_gaps
from lesiontrack.pipeline.jobs.adoption import build_adoption, retired_lesions, with_verified_identities
from lesiontrack.pipeline.jobs.contract import (
    SEG_SOP_CLASSES,
    LesionRef,
    LoadedInputs,
    LoadVolumesOutput,
    MatchPriorsOutput,
    NotAssessedRecord,
    RetrievePriorsOutput,
)
from lesiontrack.pipeline.jobs.followup_annotations import followup_prompts, person_annotations_on, unmarked_lesions
from lesiontrack.pipeline.jobs.lesion_sources import PacsAccess, earlier_sources
from lesiontrack.pipeline.jobs.ports import PROMPT_FILE, PriorTimepoint
from lesiontrack.pipeline.jobs.steps.services import Ctx, followup_series, time_key
from lesiontrack.pipeline.jobs.store import NothingToTrack, PermanentError
from lesiontrack.pipeline.jobs.verification import our_seg_of_series
from lesiontrack.pipeline.science.drawn_priors import prompt_origin

log = logging.getLogger(__name__)


def load_volumes(ctx: Ctx) -> LoadVolumesOutput:
    fu = followup_series(ctx.services.session_factory, ctx.series_uid)
    prior = ctx.outputs.get(RetrievePriorsOutput).prior.to_port()
    followup_ct = _read_ct(fu.files, ctx.series_uid, "follow-up")
    prior_ct = _read_ct(prior.ct_files, prior.ct_series_uid, "prior")
    annotation_warnings: list[str] = []
    prompts, not_assessed = read_prompts_and_gaps(prior, prior_ct, annotation_warnings)
    match = ctx.outputs.get(MatchPriorsOutput)
    unmarked: list[UnassessedSegment] = []
    prior_marks: set[str] | None = None  # set: lesions named only on earlier annotations are looked for too
    with session_scope(ctx.services.session_factory) as s:
        # a verified correction as prompt: the lesion identities its adoption recorded; lesions a reader deleted
        # are not tracked any more (issue 16)
        prompts = with_verified_identities(s, prior.annotations[0].sop_instance_uid, prompts)
        retired = retired_lesions(s, match.followup.patient_pk)
        prompts = [p for p in prompts if p.identity.tracking_uid not in retired]
        not_assessed = [g for g in not_assessed if g.identity.tracking_uid not in retired]
        if match.verification is None and prior.annotations[0].modality != PROMPT_FILE:
            ann0 = prior.annotations[0]
            marked = {p.identity.tracking_uid for p in prompts} | {g.identity.tracking_uid for g in not_assessed}
            label = f"the prior {ann0.modality} {ann0.sop_instance_uid} (series {prior.ct_series_uid})"
            unmarked = unmarked_lesions(s, match.followup.patient_pk, marked, label)
            idents = [*(p.identity for p in prompts), *(g.identity for g in not_assessed)]
            prior_marks = marked | {normalise_label(i.tracking_id) for i in idents}
        if match.verification is not None:
            our_seg = our_seg_of_series(s, ctx.series_uid, before_job=ctx.job_id)
            ctx.state.adoption = build_adoption(
                s,
                ctx.series_uid,
                match.verification,
                followup_ct,
                our_seg,
                prompts,
                ctx.services.settings.verification.overlap_match_dice,
            )
    # each lesion the prior's annotation does not mark: from its own nearest annotation by a person (issue 31 C)
    # a study only on the PACS is retrieved for them through the prior source's port, as the prior was
    source = ctx.services.prior_source
    pacs = PacsAccess(
        source.retrieve if source is not None else None, {p.ct_series_uid: p.source for p in match.priors_found}
    )
    lookup = earlier_sources(
        ctx.services.session_factory,
        match.followup.patient_pk,
        unmarked,
        time_key(prior.study_date, prior.study_time),
        annotation_warnings,
        prior_marks=prior_marks,
        pacs=pacs,
    )
    earlier = lookup.sources
    not_assessed += lookup.unassessed
    followup_anns, on_followup = [], []
    if ctx.state.adoption is None:  # a person's lesions on this follow-up itself: prompts at this timepoint
        followup_anns = person_annotations_on(ctx.services.session_factory, ctx.series_uid)
        known = [*prompts, *(p for e in earlier for p in e.prompts)]  # the same lesion keeps its identity
        on_followup = followup_prompts(followup_anns, followup_ct, known, annotation_warnings)
        on_followup = [p for p in on_followup if p.identity.tracking_uid not in retired]
    if not prompts and ctx.state.adoption is None:
        _nothing_to_track(prior, not_assessed)
    ctx.state.inputs = LoadedInputs(followup_ct, prior_ct, prompts, prior, fu.files, not_assessed, on_followup, earlier)
    return LoadVolumesOutput(
        followup_shape=list(followup_ct.shape),
        followup_spacing=[round(float(v), 4) for v in followup_ct.spacing],
        prior_shape=list(prior_ct.shape),
        prompts=len(prompts),
        annotation_warnings=annotation_warnings,
        lesions=_lesion_refs(prompts),
        earlier_lesions=_lesion_refs([p for e in earlier for p in e.prompts]),
        earlier_retrieved=lookup.retrieved,
        followup_annotations=[a.sop_instance_uid for a in followup_anns],
        followup_lesions=_lesion_refs(on_followup),
        not_assessed=[
            NotAssessedRecord(tracking_uid=g.identity.tracking_uid, tracking_id=g.identity.tracking_id, reason=g.reason)
            for g in not_assessed
        ],
    )


def _read_ct(files: list[Path], series_uid: str, role: str) -> Volume:
    """The CT volume of a series; a series that cannot be read fails the job permanently, naming it."""
    try:
        return read_series(files, series_uid=series_uid)
    except SeriesError as exc:
        raise PermanentError(f"{role} series {series_uid}: {exc}") from exc


def _nothing_to_track(prior: PriorTimepoint, not_assessed: list[UnassessedSegment]) -> NoReturn:
    """No prompt from the prior: lesions marked but none assessable is a visible failure, else nothing to track."""
    ann = prior.annotations[0]
    if not_assessed:  # lesions are marked, none can be assessed: a visible failure, not "nothing to track"
        raise PermanentError(
            f"none of the {len(not_assessed)} lesions of the prior {ann.modality} {ann.sop_instance_uid} can be "
            f"assessed: {not_assessed[0].reason}"
        )
    raise NothingToTrack(f"the prior {ann.modality} {ann.sop_instance_uid} marks no lesion")


def _lesion_refs(prompts: list[Prompt]) -> list[LesionRef]:
    return [
        LesionRef(
            tracking_uid=p.identity.tracking_uid,
            tracking_id=p.identity.tracking_id,
            kind=p.kind.value,
            prompt_origin=prompt_origin(p),
            prompt_object=p.meta.get("prompt_object"),
        )
        for p in prompts
    ]


def read_prompts(prior: PriorTimepoint, prior_ct: Volume, warnings: list[str] | None = None) -> list[Prompt]:
    """The lesion prompts of the prior's (one chosen) annotation: SEG, TID 1500 SR, presentation state (GSPS), RT
    structure set or a prompts JSON file; what it holds that cannot become a lesion is appended to ``warnings``."""
    return read_prompts_and_gaps(prior, prior_ct, warnings)[0]


def read_prompts_and_gaps(
    prior: PriorTimepoint, prior_ct: Volume, warnings: list[str] | None = None
) -> tuple[list[Prompt], list[UnassessedSegment]]:
    """The prompts of :func:`read_prompts`, and the lesions of a prior SEG that cannot be prompts (no voxel on the
    prior CT): they are reported "not assessed" with the reason and flagged, never silently dropped."""
    if not prior.annotations or not prior.annotations[0].files:
        raise PermanentError(f"prior series {prior.ct_series_uid} has no retrieved annotation")
    ann = prior.annotations[0]
    files = [Path(f) for f in ann.files]
    modality = "SEG" if ann.modality == "SEG" or ann.sop_class_uid in SEG_SOP_CLASSES else ann.modality
    said: list[AnnotationWarning] = []
    try:
        if ann.modality == PROMPT_FILE:
            return with_prompt_object(
                load_prompts_json(files[0], prior_ct, series_uid=prior.ct_series_uid), PROMPT_FILE
            ), []
        if modality == "SEG":
            try:
                prompts, gaps = read_seg_prompts_and_gaps(files[0], prior_ct)
            except Exception as exc:  # a corrupt or unreadable annotation: name the file and the problem
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise PromptSourceError(
                    f"{files[0]}: cannot read the annotation ({type(exc).__name__}: {detail})"
                ) from exc
            if not prompts and not gaps:
                raise PromptSourceError(f"{files[0]}: no lesions found in the annotation")
            return with_prompt_object(prompts, "SEG"), gaps
        prompts = list(prompts_from_object(files[0], modality, prior_ct, said))
    except NoLesionInAnnotation as exc:
        if warnings is not None:
            warnings.extend(str(w) for w in said)
        named = [w for w in said if w.lesion is not None]
        if named:  # lesions are measured, none can be assessed: a visible failure, not "nothing to track"
            raise PermanentError(
                f"none of the {len(named)} lesions of the prior {ann.modality} {ann.sop_instance_uid} can be "
                f"assessed: {named[0]}"
            ) from exc
        raise NothingToTrack(f"the prior {ann.modality} {ann.sop_instance_uid} gives no lesion: {exc}") from exc
    except PromptSourceError as exc:  # unreadable: a failure to look at, not an empty prior
        raise PermanentError(f"prior {ann.modality} {files[0]}: {exc}") from exc
    finally:
        for w in said:
            log.warning("prior annotation not used: %s", w)
    if warnings is not None:
        warnings.extend(str(w) for w in said)
    # a lesion the object names that cannot be tracked (an SR measurement group without usable coordinates) is
    # reported "not assessed" with the reason, like a SEG's empty segment — never silently dropped
    from lesiontrack.pipeline.dicom.seg.reader import UnassessedSegment

    tracked = {p.identity.tracking_uid for p in prompts}
    gaps = [
        UnassessedSegment(w.lesion, f"{w.obj}: {w.annotation}: {w.reason}")
        for w in said
        if w.lesion is not None and w.lesion.tracking_uid not in tracked
    ]
    return prompts, gaps
