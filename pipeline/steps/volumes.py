"""Step 3: read the follow-up and prior CTs and the lesion prompts of the prior's annotation."""

from __future__ import annotations

import logging
from pathlib import Path

from db.session import session_scope
from models.imaging.volume import Volume
from models.segmentation.prompts import Prompt
from pipeline.adoption import build_adoption, retired_lesions, with_verified_identities
from pipeline.contract import (
    SEG_SOP_CLASSES,
    LesionRef,
    LoadedInputs,
    LoadVolumesOutput,
    MatchPriorsOutput,
    RetrievePriorsOutput,
)
from pipeline.drawn_priors import prompt_origin
from pipeline.jobs import NothingToTrack, PermanentError
from pipeline.ports import PriorTimepoint
from pipeline.steps.services import Ctx, followup_series
from pipeline.verification import our_seg_of_series

log = logging.getLogger(__name__)


def load_volumes(ctx: Ctx) -> LoadVolumesOutput:
    from models.imaging.dicom_read import SeriesError, read_series

    fu = followup_series(ctx.services.session_factory, ctx.series_uid)
    prior = ctx.outputs.get(RetrievePriorsOutput).prior.to_port()
    try:
        followup_ct = read_series(fu.files, series_uid=ctx.series_uid)
    except SeriesError as exc:
        raise PermanentError(f"follow-up series {ctx.series_uid}: {exc}") from exc
    try:
        prior_ct = read_series(prior.ct_files, series_uid=prior.ct_series_uid)
    except SeriesError as exc:
        raise PermanentError(f"prior series {prior.ct_series_uid}: {exc}") from exc
    annotation_warnings: list[str] = []
    prompts = read_prompts(prior, prior_ct, annotation_warnings)
    match = ctx.outputs.get(MatchPriorsOutput)
    with session_scope(ctx.services.session_factory) as s:
        # a verified correction as prompt: the lesion identities its adoption recorded; lesions a reader deleted
        # are not tracked any more (issue 16)
        prompts = with_verified_identities(s, prior.annotations[0].sop_instance_uid, prompts)
        retired = retired_lesions(s, match.followup.patient_pk)
        prompts = [p for p in prompts if p.identity.tracking_uid not in retired]
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
    if not prompts and ctx.state.adoption is None:
        ann = prior.annotations[0]
        raise NothingToTrack(f"the prior {ann.modality} {ann.sop_instance_uid} marks no lesion")
    ctx.state.inputs = LoadedInputs(followup_ct, prior_ct, prompts, prior, fu.files)
    return LoadVolumesOutput(
        followup_shape=list(followup_ct.shape),
        followup_spacing=[round(float(v), 4) for v in followup_ct.spacing],
        prior_shape=list(prior_ct.shape),
        prompts=len(prompts),
        annotation_warnings=annotation_warnings,
        lesions=[
            LesionRef(
                tracking_uid=p.identity.tracking_uid,
                tracking_id=p.identity.tracking_id,
                kind=p.kind.value,
                prompt_origin=prompt_origin(p),
            )
            for p in prompts
        ],
    )


def read_prompts(prior: PriorTimepoint, prior_ct: Volume, warnings: list[str] | None = None) -> list[Prompt]:
    """The lesion prompts of the prior's (one chosen) annotation: SEG, TID 1500 SR, presentation state (GSPS) or RT
    structure set; what it holds that cannot become a lesion is appended to ``warnings``."""
    from pipeline.annotations.common import AnnotationWarning
    from pipeline.prompt_sources import NoLesionInAnnotation, PromptSourceError, prompts_from_object

    if not prior.annotations or not prior.annotations[0].files:
        raise PermanentError(f"prior series {prior.ct_series_uid} has no retrieved annotation")
    ann = prior.annotations[0]
    files = [Path(f) for f in ann.files]
    modality = "SEG" if ann.modality == "SEG" or ann.sop_class_uid in SEG_SOP_CLASSES else ann.modality
    said: list[AnnotationWarning] = []
    try:
        prompts = list(prompts_from_object(files[0], modality, prior_ct, said))
    except NoLesionInAnnotation as exc:
        if warnings is not None:
            warnings.extend(str(w) for w in said)
        raise NothingToTrack(f"the prior {ann.modality} {ann.sop_instance_uid} gives no lesion: {exc}") from exc
    except PromptSourceError as exc:  # unreadable: a failure to look at, not an empty prior
        raise PermanentError(f"prior {ann.modality} {files[0]}: {exc}") from exc
    finally:
        for w in said:
            log.warning("prior annotation not used: %s", w)
    if warnings is not None:
        warnings.extend(str(w) for w in said)
    return prompts
