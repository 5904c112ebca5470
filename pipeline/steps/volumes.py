"""Step 3: read the follow-up and prior CTs and the lesion prompts of the prior's annotation."""

from __future__ import annotations

from pathlib import Path

from models.imaging.volume import Volume
from models.segmentation.prompts import Prompt
from pipeline.contract import (
    SEG_SOP_CLASSES,
    LesionRef,
    LoadedInputs,
    LoadVolumesOutput,
    RetrievePriorsOutput,
)
from pipeline.jobs import NothingToTrack, PermanentError
from pipeline.ports import PriorTimepoint
from pipeline.steps.services import Ctx, followup_series


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
    prompts = read_prompts(prior, prior_ct)
    if not prompts:
        ann = prior.annotations[0]
        raise NothingToTrack(f"the prior {ann.modality} {ann.sop_instance_uid} marks no lesion")
    ctx.state.inputs = LoadedInputs(followup_ct, prior_ct, prompts, prior, fu.files)
    return LoadVolumesOutput(
        followup_shape=list(followup_ct.shape),
        followup_spacing=[round(float(v), 4) for v in followup_ct.spacing],
        prior_shape=list(prior_ct.shape),
        prompts=len(prompts),
        lesions=[
            LesionRef(tracking_uid=p.identity.tracking_uid, tracking_id=p.identity.tracking_id, kind=p.kind.value)
            for p in prompts
        ],
    )


def read_prompts(prior: PriorTimepoint, prior_ct: Volume) -> list[Prompt]:
    """The lesion prompts of the prior's (one chosen) annotation, SEG or TID 1500 SR."""
    from pipeline.prompt_sources import PromptSourceError, prompts_from_seg, prompts_from_sr

    if not prior.annotations or not prior.annotations[0].files:
        raise PermanentError(f"prior series {prior.ct_series_uid} has no retrieved annotation")
    ann = prior.annotations[0]
    files = [Path(f) for f in ann.files]
    try:
        if ann.modality == "SEG" or ann.sop_class_uid in SEG_SOP_CLASSES:
            return list(prompts_from_seg(files[0], prior_ct))
        return list(prompts_from_sr(files[0], prior_ct))
    except PromptSourceError as exc:
        raise PermanentError(f"prior {ann.modality} {files[0]}: {exc}") from exc
