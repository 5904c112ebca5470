"""Completion trigger vs quiet period: last routed instance → SEG + SR in Orthanc, both ways, in one run.

A real Orthanc is the PACS and an embedded LesionTrack service (SCP + in-process executor + sender + HTTP API) the
analysis node, with ``dicom.series_quiet_seconds`` = ``--quiet-seconds`` (default 30, the shipped default). For each
mode a fresh phantom patient (baseline CT + SEG uploaded to Orthanc first, not timed) gets one follow-up routed the way
docs/pacs/orthanc.md's Lua script does it: a synchronous ``/modalities/lesiontrack/store`` of the series, then — in
*trigger* mode only — ``POST /api/series/{uid}/complete``. The clock starts when the store call returns (every
instance acknowledged by LesionTrack) and stops when Orthanc lists both our SEG and SR in the follow-up study.

    .venv/bin/python bench/completion_trigger.py [--quiet-seconds 30] > result.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _results_in_orthanc(orthanc: Any, study_uid: str) -> set[str]:
    found = orthanc.post("/tools/lookup", study_uid)
    if not found:
        return set()
    return {s["MainDicomTags"].get("Modality") for s in orthanc.get_json(f"/studies/{found[0]['ID']}/series")}


def run_mode(mode: str, seed: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from lesiontrack.demo import demo_settings
    from lesiontrack.demo_data import make_patient
    from lesiontrack.service import LesionTrackService
    from tests.support.services import OrthancServer, free_port

    shape = (args.slices, args.matrix, args.matrix)
    patient = make_patient(
        root / f"patient-{mode}", seed=seed, shape=shape, spacing=(args.spacing,) * 3, n_lesions=3, n_followups=1
    )
    lt_port = free_port()
    orthanc = OrthancServer(root / f"orthanc-{mode}", modalities={"lesiontrack": ("LESIONTRACK", "127.0.0.1", lt_port)})
    orthanc.start()
    settings = demo_settings(
        root / f"data-{mode}",
        http=True,
        dicom={"port": lt_port, "series_quiet_seconds": args.quiet_seconds},
        pacs=[
            {
                "name": "orthanc",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "query": True,
                "send": True,
            }
        ],
        sending={"destinations": ["orthanc"], "retry_schedule_seconds": [1, 2, 5]},
    )
    service = LesionTrackService(settings).start()
    try:
        for f in [*patient.baseline.files, patient.seg_file]:
            orthanc.upload(f)
        fu = patient.followups[0]
        ids = [orthanc.upload(f) for f in fu.files]
        series_id = orthanc.get_json(f"/instances/{ids[0]}")["ParentSeries"]
        orthanc.post("/modalities/lesiontrack/store", {"Resources": [series_id], "Synchronous": True})
        t0 = time.monotonic()
        trigger_s = None
        if mode == "trigger":
            req = urllib.request.Request(
                f"http://127.0.0.1:{settings.http.port}/api/series/{fu.series_uid}/complete",
                method="POST",
                headers={"X-API-Key": "demo"},
                data=b"",
            )
            with urllib.request.urlopen(req, timeout=30) as r:
                assert json.loads(r.read())["completed"]
            trigger_s = time.monotonic() - t0
        deadline = t0 + args.timeout
        while not {"SEG", "SR"} <= _results_in_orthanc(orthanc, fu.study_uid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{mode}: no SEG + SR in Orthanc after {args.timeout} s")
            time.sleep(0.2)
        total = time.monotonic() - t0
        view = service.job_store.latest_for_series(fu.series_uid)
        steps = {k: round(v, 2) for k, v in (view.step_timings or {}).items()}
        return {
            "mode": mode,
            "seed": seed,
            "last_routed_instance_to_seg_sr_in_orthanc_s": round(total, 2),
            "trigger_call_s": None if trigger_s is None else round(trigger_s, 3),
            "analysis_steps_s": round(sum(steps.values()), 2),
            "steps_s": steps,
            "job_state": view.state.value,
        }
    finally:
        service.stop()
        orthanc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quiet-seconds", type=float, default=30.0)
    ap.add_argument("--slices", type=int, default=40)
    ap.add_argument("--matrix", type=int, default=96)
    ap.add_argument("--spacing", type=float, default=3.0)
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lt-bench-trigger-") as tmp:
        root = Path(tmp)
        # the same input both ways (fresh Orthanc, database and patient files each): only the completion differs
        runs = [run_mode("quiet", 31, args, root), run_mode("trigger", 31, args, root)]
    quiet, trig = (r["last_routed_instance_to_seg_sr_in_orthanc_s"] for r in runs)
    print(
        json.dumps(
            {
                "benchmark": "completion trigger vs quiet period",
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}",
                "quiet_seconds": args.quiet_seconds,
                "phantom": f"{args.slices}x{args.matrix}x{args.matrix} @ {args.spacing} mm, 3 lesions",
                "runs": runs,
                "saved_s": round(quiet - trig, 2),
                "saved_at_least_quiet_period": quiet - trig >= args.quiet_seconds,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
