"""Small pipelines for exercising the job machinery across processes (``--pipeline tests.support.job_pipelines:NAME``).

Each step leaves an audit event ``test.step_ran`` (so a test can count runs per job across worker processes) and
the durable step writes a result file whose content depends only on the series UID (so results can be compared
between embedded and scale-out runs).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from lesiontrack.db.repository import audit
from lesiontrack.db.session import session_scope
from lesiontrack.pipeline.jobs.analysis import JobContext, Step, StepOutput
from lesiontrack.pipeline.jobs.contract import WriteSegSrOutput

Ctx = JobContext[Any, Any]


class Computed(StepOutput):
    digest: str


class Written(StepOutput):
    path: str

    def still_valid(self) -> bool:
        return Path(self.path).exists()


def _ran(ctx: Ctx, step: str) -> None:
    with session_scope(ctx.services["sf"]) as s:
        audit(s, ctx.worker, "test.step_ran", "job", ctx.job_id, step=step, pid=os.getpid())


def counting(
    settings: Any, session_factory: Any, prior_source: Any = None, sender: Any = None
) -> tuple[list[Step[Any, Any, Any]], Any]:
    out_dir = Path(settings.data_dir) / "results"
    block = Path(settings.data_dir) / "block"  # while this file exists, 'compute' waits (fault tests)

    def compute(ctx: Ctx) -> Computed:
        _ran(ctx, "compute")
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        started = Path(settings.data_dir) / f"started-{ctx.job_id}"
        started.write_text(str(os.getpid()))
        import time

        while block.exists():  # held by the test, which kills or releases this process
            time.sleep(0.05)
        digest = hashlib.sha256(ctx.series_uid.encode()).hexdigest()
        for _ in range(20000):  # a little real work so jobs overlap between workers
            digest = hashlib.sha256(digest.encode()).hexdigest()
        return Computed(digest=digest)

    def write(ctx: Ctx) -> Written:
        _ran(ctx, "write")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{ctx.series_uid}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"series": ctx.series_uid, "digest": ctx.outputs.get(Computed).digest}))
        tmp.replace(path)
        return Written(path=str(path))

    steps: list[Step[Any, Any, Any]] = [
        Step("compute", compute, Computed),
        Step("write", write, Written, durable=True),
    ]
    return steps, {"sf": session_factory}


def counting_with_send(
    settings: Any, session_factory: Any, prior_source: Any = None, sender: Any = None
) -> tuple[list[Step[Any, Any, Any]], Any]:
    """``counting`` plus a result object (a new-UID copy of one received instance) sent by the real send step."""
    from lesiontrack.pipeline.jobs.contract import SendOutput
    from lesiontrack.pipeline.jobs.steps import send

    steps, _ = counting(settings, session_factory)

    def write_result(ctx: Ctx) -> WriteSegSrOutput:
        import pydicom
        from pydicom.uid import generate_uid
        from sqlalchemy import select

        from lesiontrack.db.models import Instance, Series

        _ran(ctx, "write_seg_sr")
        with session_scope(session_factory) as s:
            path = s.scalar(
                select(Instance.file_path)
                .join(Series, Instance.series_pk == Series.id)
                .where(Series.series_instance_uid == ctx.series_uid)
                .limit(1)
            )
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesDescription = "result"
        out = Path(settings.data_dir) / "results" / f"job-{ctx.job_id}"
        out.mkdir(parents=True, exist_ok=True)
        target = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(target, enforce_file_format=True)
        return WriteSegSrOutput(
            files=[str(target)], seg=None, sr=None, seg_sop_instance_uid=None, present=0, vanished=0
        )

    steps = [
        *steps,
        Step(WriteSegSrOutput.step, write_result, WriteSegSrOutput, durable=True),
        Step(SendOutput.step, send, SendOutput, durable=True),
    ]
    return steps, _Services(settings, session_factory, prior_source, sender)


class _Services(dict[str, Any]):
    """PipelineServices attributes for the real send step + the 'sf' key the counting steps use."""

    def __init__(self, settings: Any, sf: Any, prior_source: Any, sender: Any) -> None:
        super().__init__(sf=sf)
        self.settings, self.session_factory, self.prior_source, self.sender = settings, sf, prior_source, sender
