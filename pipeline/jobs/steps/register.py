"""Step 4: register the prior CT onto the follow-up with the configured engine."""

from __future__ import annotations

from lesiontrack.models.engines import build_registration
from lesiontrack.pipeline.jobs.contract import RegisterOutput
from lesiontrack.pipeline.jobs.steps.services import Ctx


def register(ctx: Ctx) -> RegisterOutput:

    settings = ctx.services.settings
    name = settings.engines.registration
    engine = build_registration(name, settings.engines, device=ctx.device, seed=settings.compute.seed)
    inputs = ctx.state.need_inputs()
    reg = engine.register(inputs.prior_ct, inputs.followup_ct)
    ctx.state.registration = reg
    q = reg.quality
    return RegisterOutput(
        engine=str(getattr(engine, "name", name)),
        version=str(getattr(engine, "version", "")),
        device=q.device,
        similarity=q.similarity_metric,
        before=q.similarity_before,
        after=q.similarity_after,
        folding_fraction=q.folding_fraction,
        stage_seconds={k: float(v) for k, v in q.stage_seconds.items()},
    )
