"""The prior lesion a drawing becomes, without tracking (issue 31): per lesion, the Dice against the truth of the
baseline lesion derived from one drawing kind, as bench/annotations.py derives it (the same patients, drawings and
engine; its "prior Dice" column) — seconds instead of minutes, for development. Prints one JSON document.

Usage: ``python bench/drawn_priors_only.py --phantom-seeds 41,42,43 --lung1-seeds 13 [--kind arrow]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.drawn_lesions import drawings
from bench.tracking import Patient, lung1_patient, phantom_patient, truth_prompts
from lesiontrack.models.engines import build_segmentation
from lesiontrack.models.segmentation.components import keep_nearest_component
from lesiontrack.pipeline.dicom.annotations.common import drawing_prompt
from lesiontrack.pipeline.science.drawn_priors import drawn_lesion
from lesiontrack.pipeline.science.tracking import TrackingOptions


def _seeds(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def prior_rows(p: Patient, kind: str) -> list[dict[str, object]]:
    """One row per baseline lesion of ``p``: its kind, the derived prior's Dice and voxels, and the notes."""
    rng = np.random.default_rng(sum(map(ord, p.name)))  # the drawings bench/annotations.py draws
    engine = build_segmentation("adaptive")
    reach = TrackingOptions().max_centre_distance_mm
    rows: list[dict[str, object]] = []
    for sp in truth_prompts(p):
        assert sp.mask is not None
        prompt = drawing_prompt(sp.identity, drawings(sp.mask, rng)[kind], f"{kind} {sp.identity.tracking_id}")
        got = drawn_lesion(p.cts[0], prompt, engine)
        assert got is not None
        m = keep_nearest_component(got.mask, prompt.centre_mm(), reach).array > 0
        g = p.labels[0].array == sp.identity.label
        dice = float(2 * (m & g).sum() / max(int(m.sum() + g.sum()), 1))
        rows.append(
            {
                "patient": p.name,
                "label": sp.identity.label,
                "kind": p.kinds.get(sp.identity.label, ""),
                "prior_dice": round(dice, 3),
                "voxels": int(m.sum()),
                "truth_voxels": int(g.sum()),
                "notes": got.notes,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phantom-seeds", default="41,42,43")
    ap.add_argument("--lung1-seeds", default="13")
    ap.add_argument("--slice-mm", type=float, default=5.0)
    ap.add_argument("--kind", default="arrow", choices=["arrow", "line", "bidirectional", "ellipse"])
    args = ap.parse_args()
    t0 = time.perf_counter()
    patients = [phantom_patient(s, 0, args.slice_mm) for s in _seeds(args.phantom_seeds)]
    patients += [p for p in (lung1_patient(s, 0) for s in _seeds(args.lung1_seeds)) if p is not None]
    rows = [r for p in patients for r in prior_rows(p, args.kind)]
    dice = [float(str(r["prior_dice"])) for r in rows]
    doc = {
        "benchmark": f"prior lesions from a {args.kind} (issue 31), no tracking",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python " + " ".join(sys.argv),
        "patients": [p.name for p in patients],
        "prior_dice_mean": round(float(np.mean(dice)), 4) if dice else None,
        "prior_dice_min": round(float(np.min(dice)), 4) if dice else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
