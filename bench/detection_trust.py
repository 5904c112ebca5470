"""The new-lesion search's trust check: residual fraction (searched tissue differing from the registered prior,
z ≥ 0.5) with and without registration, on demo phantoms and real CT; prints one JSON document.

Usage: ``.venv/bin/python bench/detection_trust.py [--real]`` (``--real`` adds lung1 / body_ct / phantom scans of
bench/new_lesions.py with convex registration; minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lesiontrack.config.settings import EngineSettings
from lesiontrack.demo_data import FollowUps, make_patient
from lesiontrack.models.detection import DetectionOptions, search_new_lesions
from lesiontrack.models.engines import build_registration
from lesiontrack.models.imaging.dicom_read import read_series


def demo_cases(tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for seed in (7, 11):
        for motion in (False, True):
            p = make_patient(
                tmp / f"s{seed}m{motion}",
                seed=seed,
                shape=(64, 112, 112),
                spacing=(2.5, 2.5, 3.0),
                n_lesions=3,
                n_followups=1,
                follow_ups=FollowUps.MOTION if motion else FollowUps.STILL,
                new_lesions={1: [("liver", 14.0, 25.0)]},
            )
            base, fu = read_series(p.baseline.files), read_series(p.followups[0].files)
            for engine in ("none", "convex"):
                reg = build_registration(engine, EngineSettings(working_spacing_mm=4.0)).register(base, fu)
                r = search_new_lesions(fu, reg.warp_image(base), None, DetectionOptions(max_residual_fraction=1.0))
                rows.append(
                    {"scan": f"demo{seed}", "motion": motion, "registration": engine,
                     "residual_fraction": r.residual_fraction, "candidates": len(r.candidates)}
                )  # fmt: skip
    return rows


def real_cases() -> list[dict[str, Any]]:
    from bench.new_lesions import convex_warp, make_scan

    rows = []
    for kind, seed in (("lung1", 31), ("body_ct", 41), ("phantom", 21)):
        scan = make_scan(kind, seed)
        warped, _seconds = convex_warp(scan, 3.0, None)
        r = search_new_lesions(scan.followup, warped, None, DetectionOptions(max_residual_fraction=1.0))
        rows.append(
            {"scan": f"{kind}{seed}", "motion": True, "registration": "convex",
             "residual_fraction": r.residual_fraction, "candidates": len(r.candidates)}
        )  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = demo_cases(Path(tmp))
    if args.real:
        rows += real_cases()
    limit = DetectionOptions().max_residual_fraction
    print(json.dumps({"max_residual_fraction": limit, "rows": rows,
                      "untrusted": [r for r in rows if r["residual_fraction"] > limit]}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
