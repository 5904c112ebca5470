"""End-to-end benchmark: last follow-up instance stored → SEG + SR acknowledged by the PACS (real Orthanc).

Embedded mode (`lesiontrack serve` as its own process: SCP + in-process executor + sender), CPU, default engines.
A chest-size phantom patient (baseline with 5 lesions as a DICOM-SEG in Orthanc, ``--followups`` synthetic follow-ups
with growth/shrinkage and patient motion) is generated first (not timed). The follow-ups are C-STOREd to LesionTrack
one after another as a PACS routing rule would; the last one (by default the third, with two earlier timepoints and
two SEG/SR of ours in the database) is timed: the clock starts when its last instance is acknowledged and stops at the
moment the delivery of SEG + SR to Orthanc succeeded (Orthanc's C-STORE response). Reported: total,
series-completion wait (quiet period), per-step times from the job record, the service process's peak RSS (VmHWM)
and, per follow-up, which annotation it was propagated from.

    .venv/bin/python bench/e2e.py [--slices 200 --matrix 256 --spacing 1.5] > result.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from lesiontrack.pipeline.jobs.store import JobStore, JobView
    from tests.support.services import OrthancServer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--matrix", type=int, default=256)
    ap.add_argument("--spacing", type=float, default=1.5, help="isotropic voxel size of the phantom (mm)")
    ap.add_argument("--lesions", type=int, default=5)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--quiet-seconds", type=float, default=2.0, help="series completion quiet period")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument(
        "--followups",
        type=int,
        default=3,
        help="follow-ups routed one after another; the last one is timed (the third has two earlier timepoints)",
    )
    return ap.parse_args()


def _write_config(root: Path, lt_port: int, orthanc: OrthancServer, quiet_seconds: float) -> Path:
    """The site's lesiontrack.toml: the node on ``lt_port``, Orthanc as the one PACS (C-MOVE priors, results back)."""
    cfg = root / "lesiontrack.toml"
    cfg.write_text(f"""
data_dir = "{root / "data"}"
[dicom]
bind_address = "127.0.0.1"
port = {lt_port}
series_quiet_seconds = {quiet_seconds}
[http]
enabled = false
[[pacs]]
name = "orthanc"
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
retrieve_method = "C-MOVE"
query = true
send = true
[sending]
destinations = ["orthanc"]
retry_schedule_seconds = [2, 5, 10]
""")
    return cfg


def _wait_delivered(
    store: JobStore, sf: sessionmaker[Session], proc: subprocess.Popen[bytes], series_uid: str, log: Path
) -> tuple[JobView, datetime]:
    """Poll until the series' job finished and every delivery of its results is acknowledged (30 minutes at most);
    the job's view and the last delivery's time."""
    from sqlalchemy import select

    from lesiontrack.db.models import Delivery, DeliveryState
    from lesiontrack.db.session import session_scope

    started = time.monotonic()
    while time.monotonic() - started < 1800:
        view = store.latest_for_series(series_uid)
        if view is not None and view.finished:
            if view.error:
                raise RuntimeError(f"job {view.id} {view.state.value}: {view.error}")
            with session_scope(sf) as s:
                ds = s.scalars(select(Delivery).where(Delivery.job_pk == view.id)).all()
                if ds and all(d.state is DeliveryState.DELIVERED for d in ds):
                    return view, max(d.delivered_at for d in ds if d.delivered_at is not None)
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}; see {log}")
        time.sleep(0.2)
    raise TimeoutError("no delivery within 30 minutes")


def _followup_row(n: int, view: JobView, delivered_at: datetime, t_last: datetime) -> dict[str, object]:
    """An earlier follow-up's figures: last instance to results acknowledged, and where its prompts came from."""
    from lesiontrack.pipeline.jobs.contract import job_results

    d_at = delivered_at if delivered_at.tzinfo else delivered_at.replace(tzinfo=UTC)
    match = job_results(view.step_outputs).match
    return {
        "followup": n,
        "total_s": round((d_at - t_last).total_seconds(), 2),
        "prompt_source": match.prompt_source.reason if match and match.prompt_source else None,
    }


def main() -> None:
    args = _arguments()

    from lesiontrack.config.settings import PacsPeer, load_settings
    from lesiontrack.db.session import make_engine, make_session_factory
    from lesiontrack.demo_data import make_patient
    from lesiontrack.dicom_node.outbound.scu import store_files
    from lesiontrack.pipeline.jobs.contract import job_results
    from lesiontrack.pipeline.jobs.store import JobStore
    from tests.support.services import OrthancServer, free_port, wait_for_port

    root = args.workdir or Path(tempfile.mkdtemp(prefix="lt-bench-e2e-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    patient = make_patient(
        root / "patient",
        seed=args.seed,
        shape=(args.slices, args.matrix, args.matrix),
        spacing=(args.spacing,) * 3,
        n_lesions=args.lesions,
        n_followups=args.followups,
    )
    gen_s = time.monotonic() - t0
    lt_port = free_port()
    orthanc = OrthancServer(root / "orthanc", modalities={"lesiontrack": ("LESIONTRACK", "127.0.0.1", lt_port)})
    orthanc.start()
    cfg = _write_config(root, lt_port, orthanc, args.quiet_seconds)
    settings = load_settings(cfg)
    proc = None
    try:
        for f in [*patient.baseline.files, patient.seg_file]:
            orthanc.upload(f)
        env = {**os.environ, "LESIONTRACK_CONFIG": str(cfg), "TCP_NODELAY": "1"}
        with open(root / "serve.log", "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [sys.executable, "-c", "from lesiontrack.cli import main; main()", "serve", "--upgrade-db"],
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(lt_port, timeout=120)
        rss_idle = _peak_rss_mb(proc.pid)
        peer = PacsPeer(name="lt", ae_title="LESIONTRACK", host="127.0.0.1", port=lt_port)
        sf = make_session_factory(make_engine(settings.effective_database_url))
        store = JobStore(sf)
        earlier: list[dict[str, object]] = []
        view: JobView | None = None
        delivered_at: datetime | None = None
        for n, fu in enumerate(patient.followups, start=1):
            outcomes = store_files(settings, peer, fu.files)
            t_last = datetime.now(UTC)
            assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok][:3]
            view, delivered_at = _wait_delivered(store, sf, proc, fu.series_uid, root / "serve.log")
            if n < len(patient.followups):
                earlier.append(_followup_row(n, view, delivered_at, t_last))
        if delivered_at is None or view is None:  # no follow-up routed (--followups 0)
            raise RuntimeError("no follow-up was timed")
        results = job_results(view.step_outputs)
        if delivered_at.tzinfo is None:
            delivered_at = delivered_at.replace(tzinfo=UTC)
        created = view.created_at
        total = (delivered_at - t_last).total_seconds()
        peak = _peak_rss_mb(proc.pid)
        import pydicom

        fu_shape = pydicom.dcmread(fu.files[0], stop_before_pixels=True)
        result = {
            "benchmark": "e2e",
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, CPU only",
            "case": {
                "baseline_shape_kji": [args.slices, args.matrix, args.matrix],
                "spacing_mm": args.spacing,
                "followup_slices": len(fu.files),
                "followup_matrix": [int(fu_shape.Rows), int(fu_shape.Columns)],
                "lesions": len(patient.lesions),
            },
            "mode": "embedded (lesiontrack serve: SCP + in-process executor + sender), Orthanc PACS, C-MOVE priors",
            "seconds": {
                "total_last_instance_to_seg_sr_acknowledged": round(total, 2),
                "series_completion_wait": round((created - t_last).total_seconds(), 2) if created else None,
                "steps": {k: round(float(v), 2) for k, v in view.step_timings.items()},
            },
            "series_quiet_seconds": args.quiet_seconds,
            "peak_rss_mb": {
                "serve_process": round(peak, 1) if peak else None,
                "serve_idle": round(rss_idle, 1) if rss_idle else None,
            },
            "targets": {"total_s": 120, "peak_rss_mb": 4096},
            "timed_followup": len(patient.followups),
            "earlier_followups": earlier,
            "patient_generation_s": round(gen_s, 1),
            "job": {
                "id": view.id,
                "attempts": view.attempts,
                "registration": results.register.model_dump() if results.register else {},
                "prompt_source": (
                    results.match.prompt_source.reason if results.match and results.match.prompt_source else None
                ),
                "lesions": [(les.tracking_id, les.status) for les in (results.track.lesions if results.track else [])],
            },
        }
        print(json.dumps(result, indent=1, default=str))
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        orthanc.stop()


if __name__ == "__main__":
    main()
