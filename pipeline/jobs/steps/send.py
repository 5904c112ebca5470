"""Step 8: queue the written SEG + SR for delivery (once per job: a resumed job reuses its deliveries)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from lesiontrack.db.models import Delivery
from lesiontrack.db.session import session_scope
from lesiontrack.pipeline.jobs.contract import SendOutput, WriteSegSrOutput
from lesiontrack.pipeline.jobs.steps.services import Ctx
from lesiontrack.pipeline.jobs.store import PermanentError


def send(ctx: Ctx) -> SendOutput:
    svc = ctx.services
    files = ctx.outputs.get(WriteSegSrOutput).files
    if not files:
        return SendOutput(deliveries=[], note="nothing to send")
    if not svc.settings.sending.destinations:
        return SendOutput(deliveries=[], note="no destinations configured (sending.destinations)")
    with session_scope(svc.session_factory) as s:
        existing = [
            d.id
            for d in s.scalars(select(Delivery).where(Delivery.job_pk == ctx.job_id))
            if list(d.file_paths) == list(files)
        ]
    if existing:
        return SendOutput(deliveries=existing, reused=True)
    if svc.sender is None:
        raise PermanentError("no result sender configured (dicom_node unavailable)")
    ids = svc.sender.send([Path(f) for f in files], job_id=ctx.job_id)
    return SendOutput(deliveries=list(ids), destinations=list(svc.settings.sending.destinations))
