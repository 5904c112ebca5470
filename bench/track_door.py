"""`lesiontrack track` runs the service's analysis (issue 30): new lesions reported per timepoint, and what it costs.

Per seed a phantom patient (``lesiontrack.demo_data.make_patient``: baseline + radiologist's SEG, three follow-ups on
the baseline's position, 3 tracked lesions) with a lung nodule that appears at follow-up ``--appears`` and stays.
Each patient goes through ``lesiontrack track`` (CliRunner, registration 'none', working spacing 3 mm); reported per
follow-up: the job's state, the number of new-lesion candidates and whether one lies within 5 mm of the nodule, plus
the wall time of the whole command. Anchor, measured in the same run on the same series: the tracking loop alone
(``pipeline.science.tracking.track_lesions`` from the baseline SEG, what ``track`` ran before issue 30, without
writing).

This checks behaviour behind a door, not accuracy: the detector under motion and on real CT is measured by
bench/new_lesions.py; tracking accuracy by bench/tracking.py.

    .venv/bin/python bench/track_door.py --seeds 7,11,23 > result.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
from typer.testing import CliRunner

from lesiontrack.cli import app
from lesiontrack.demo_data import DemoPatient, FollowUps, make_patient

ENGINES_TOML = '[engines]\nregistration = "none"\nworking_spacing_mm = 3.0\n'


def _folders(patient: DemoPatient, root: Path) -> list[Path]:
    out = []
    series = [("t0", [*patient.baseline.files, patient.seg_file])]
    series += [(f"t{i}", fu.files) for i, fu in enumerate(patient.followups, start=1)]
    for name, files in series:
        d = root / "in" / name
        d.mkdir(parents=True)
        for f in files:
            shutil.copy(f, d / f.name)
        out.append(d)
    return out


def _loop_seconds(patient: DemoPatient) -> float:
    """The anchor: the tracking loop alone over the same series, from the baseline SEG."""
    from lesiontrack.demo import demo_settings
    from lesiontrack.models.engines import build_registration, build_segmentation
    from lesiontrack.models.imaging.dicom_read import read_series
    from lesiontrack.pipeline.dicom.prompt_sources import prompts_from_seg
    from lesiontrack.pipeline.science.lesions import Timepoint
    from lesiontrack.pipeline.science.tracking import TrackingOptions, track_lesions

    engines = demo_settings(Path(tempfile.mkdtemp()), http=False, engines={"registration": "none"}).engines
    t0 = time.perf_counter()
    cts = [read_series(s.files, series_uid=s.series_uid) for s in [patient.baseline, *patient.followups]]
    tps = [Timepoint(s.series_uid, ct) for s, ct in zip([patient.baseline, *patient.followups], cts, strict=True)]
    prompts = prompts_from_seg(patient.seg_file, cts[0])
    track_lesions(
        tps,
        prompts,
        source_index=0,
        registration=build_registration("none", engines),
        segmentation=build_segmentation(engines.segmentation, engines),
        options=TrackingOptions(),
    )
    return time.perf_counter() - t0


def run_seed(seed: int, appears: int, root: Path) -> dict[str, Any]:
    nodule = [("lung", 12.0, 30.0)]
    patient = make_patient(
        root / "patient",
        seed=seed,
        shape=(64, 112, 112),
        spacing=(2.5, 2.5, 3.0),
        n_lesions=3,
        n_followups=3,
        follow_ups=FollowUps.STILL,
        new_lesions={k: nodule for k in range(appears, 4)},
    )
    dirs = _folders(patient, root)
    cfg = root / "engines.toml"
    cfg.write_text(ENGINES_TOML)
    args = ["--config", str(cfg), "track", "--baseline", str(dirs[0])]
    for d in dirs[1:]:
        args += ["--followup", str(d)]
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, [*args, "--out", str(root / "out")])
    seconds = time.perf_counter() - t0
    summary = json.loads((root / "out" / "tracking.json").read_text())
    centre = patient.truth["new_lesions"][0]["centre_mm"]
    rows = []
    for tp in summary["timepoints"][1:]:
        cands = tp.get("candidates", [])
        near = [c for c in cands if np.linalg.norm(np.subtract(c["centre_mm"], centre)) < 5.0]
        rows.append(
            {"timepoint": tp["index"], "state": tp["state"], "candidates": len(cands), "nodule_reported": bool(near)}
        )
    with_nodule = [r for r in rows if r["timepoint"] >= appears]
    return {
        "seed": seed,
        "exit_code": res.exit_code,
        "timepoints": rows,
        "nodule_reported": f"{sum(r['nodule_reported'] for r in with_nodule)}/{len(with_nodule)}",
        "false_candidates_before": sum(r["candidates"] for r in rows if r["timepoint"] < appears),
        "track_seconds": round(seconds, 1),
        "anchor_loop_seconds": round(_loop_seconds(patient), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="7,11,23")
    ap.add_argument("--appears", type=int, default=2, help="follow-up (1..3) at which the nodule appears")
    a = ap.parse_args()
    results = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        with tempfile.TemporaryDirectory(prefix="lt-trackdoor-") as tmp:
            results.append(run_seed(seed, a.appears, Path(tmp)))
    print(
        json.dumps(
            {
                "benchmark": "track_door",
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                "appears_at_followup": a.appears,
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
