"""Small pipelines for exercising the job machinery across processes (``--pipeline tests.job_pipelines:NAME``).

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

from db.repository import audit
from db.session import session_scope
from pipeline.analysis import JobContext, Step


def _ran(ctx: JobContext, step: str) -> None:
    with session_scope(ctx.services["sf"]) as s:
        audit(s, ctx.worker, "test.step_ran", "job", ctx.job_id, step=step, pid=os.getpid())


def counting(settings: Any, session_factory: Any, prior_source: Any = None, sender: Any = None
             ) -> tuple[list[Step], Any]:
    out_dir = Path(settings.data_dir) / "results"
    block = Path(settings.data_dir) / "block"   # while this file exists, 'compute' waits (fault tests)

    def compute(ctx: JobContext) -> dict[str, Any]:
        _ran(ctx, "compute")
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        started = Path(settings.data_dir) / f"started-{ctx.job_id}"
        started.write_text(str(os.getpid()))
        import time

        while block.exists():   # held by the test, which kills or releases this process
            time.sleep(0.05)
        digest = hashlib.sha256(ctx.series_uid.encode()).hexdigest()
        for _ in range(20000):  # a little real work so jobs overlap between workers
            digest = hashlib.sha256(digest.encode()).hexdigest()
        return {"digest": digest}

    def write(ctx: JobContext) -> dict[str, Any]:
        _ran(ctx, "write")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{ctx.series_uid}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"series": ctx.series_uid, "digest": ctx.outputs["compute"]["digest"]}))
        tmp.replace(path)
        return {"path": str(path)}

    steps = [Step("compute", compute), Step("write", write, durable=True,
                                             still_valid=lambda o: Path(o["path"]).exists())]
    return steps, {"sf": session_factory}
