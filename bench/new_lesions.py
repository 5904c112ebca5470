"""New-lesion detection benchmark (issue 15); prints one JSON document.

Scans: a baseline (digital phantom ``synthetic.phantom`` with its 6 lesions, the real chest CT ``real/lung1`` with
its real tumour, or the real thorax/abdomen CT ``real/body_ct``) and one synthetic follow-up of it. In the
baseline frame every existing lesion grows or shrinks (``grow_lesion``, LesionLocator-style), and new lobulated
lesions (``insert_lesion``, measured axial diameter ≈ 5–20 mm) appear, one per tissue where the CT has room
for it, plus one more in a random tissue:
a solid lung nodule (−50…50 HU) in lung parenchyma, a hypodense lesion (25–60 HU below) in homogeneous enhancing
parenchyma (liver-like, 80–160 HU), and a node (20–60 HU) in fat. Then the patient moves (rotation ±4°,
translation ±12 mm, elastic 4 mm, breathing 6 mm; exact analytic motion), is imaged on another grid (other slice
spacing and pixel size, shifted field of view — "another scanner") with contrast-phase scaling 0.9–1.1 and extra
noise 0–12 HU (``synthetic.synthesis`` helpers).

The detector gets the follow-up, the baseline warped onto it and the tracked lesions (the truth labels of the
pre-existing lesions on the follow-up, i.e. a perfect tracking result). Two warps, same scans:

* ``oracle``: the exact inverse of the synthetic motion (upper bound: no registration error);
* ``convex``: the product's default registration engine (``models.registration.get_engine("convex")``) at
  ``--spacing`` mm (registrations cached on disk by content hash with ``--cache``).

A new lesion is found when a candidate with confidence ≥ 0.5 overlaps it; a candidate that overlaps no new lesion
is a false candidate. Size bins use the lesion's measured longest axial diameter on the follow-up truth mask.
``--timing`` adds the detector's time on a 512×512×300 scan (real lung1 resampled to 0.8 mm slices).

    .venv/bin/python bench/new_lesions.py --set tune --methods oracle
    .venv/bin/python bench/new_lesions.py --set heldout --methods oracle,convex --cache /tmp/nl-regcache --timing
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.detection import DetectionOptions, detect_new_lesions
from models.detection.new_lesions import _axial_diameter
from models.imaging.volume import Volume
from synthetic.lesion_change import default_growth, grow_lesion, insert_lesion
from synthetic.synthesis import SynthConfig, _followup_grid, _intensity_change
from synthetic.transforms import SpatialTransform, apply_transform, random_patient_motion

SHARED = Path(os.environ.get("LESIONTRACK_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
# (background, seed); tuning seeds and held-out seeds never overlap
SETS = {
    "tune": [("phantom", 11), ("phantom", 12), ("lung1", 1), ("body_ct", 1)],
    "heldout": [
        ("phantom", 31),
        ("phantom", 32),
        ("phantom", 33),
        ("phantom", 34),
        ("lung1", 31),
        ("lung1", 32),
        ("body_ct", 31),
        ("body_ct", 32),
    ],
}


@dataclass
class Scan:
    name: str
    baseline: Volume
    followup: Volume
    transform: SpatialTransform  # follow-up mm → baseline mm
    new_truth: dict[int, dict[str, Any]]  # label → tissue, nominal diameter, measured diameter
    fu_labels: np.ndarray  # follow-up truth labels (pre-existing < 100 ≤ new)
    info: dict[str, Any] = field(default_factory=dict)


def background(kind: str, seed: int) -> tuple[Volume, Volume]:
    """Baseline CT (int16) and its lesion labels (uint16)."""
    if kind == "phantom":
        from synthetic.phantom import make_phantom

        ph = make_phantom(seed=seed)
        return ph.ct, ph.lesions.with_array(ph.lesions.array.astype(np.uint16))
    if kind == "lung1":
        ct = Volume.read(str(SHARED / "real/lung1/lung1_image.nrrd"))
        lab = Volume.read(str(SHARED / "real/lung1/lung1_label.nrrd"))
        lab = lab if lab.same_grid(ct) else lab.resample_to(ct, label=True)
        return ct.with_array(ct.array.astype(np.int16)), lab.with_array((lab.array > 0).astype(np.uint16))
    ct = Volume.read(str(SHARED / "real/body_ct/ct.nii.gz"))
    ct = ct.with_array(np.clip(ct.array, -1024, 3071).astype(np.int16))
    return ct, ct.with_array(np.zeros(ct.shape, np.uint16))


def pick_site(
    ct: Volume, avoid: np.ndarray, tissue: str, radius: float, rng: np.random.Generator
) -> tuple[np.ndarray, float] | None:
    """A site for a new lesion of ``radius`` mm in ``tissue`` (by local HU statistics), its lesion HU."""
    arr = ct.array
    sp = ct.spacing[::-1]
    r_vox = np.maximum(1, np.ceil((radius + 4.0) / sp)).astype(int)
    z_margin = int(np.ceil(25.0 / sp[0]))
    clear = np.maximum(1, np.ceil((2 * radius + 15.0) / sp)).astype(int)
    ranges = {"lung": (-900.0, -750.0), "liver": (80.0, 160.0), "soft tissue": (-130.0, -70.0)}
    lo = [z_margin if a == 0 else r + 2 for a, r in enumerate(r_vox)]
    hi = [n - (z_margin if a == 0 else r + 2) for a, (r, n) in enumerate(zip(r_vox, arr.shape, strict=True))]
    if any(h <= low for low, h in zip(lo, hi, strict=True)):
        return None
    inner = arr[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    pool = np.flatnonzero((inner > ranges[tissue][0]) & (inner < ranges[tissue][1]))
    if pool.size == 0:
        return None
    for flat in rng.choice(pool, size=min(pool.size, 4000), replace=False):
        c = [int(v) + low for v, low in zip(np.unravel_index(int(flat), inner.shape), lo, strict=True)]
        box = tuple(slice(v - r, v + r + 1) for v, r in zip(c, r_vox, strict=True))
        far = tuple(slice(max(0, v - r), v + r + 1) for v, r in zip(c, clear, strict=True))
        if avoid[far].any():
            continue
        patch = arr[box].astype(np.float32)
        mean, sd = float(patch.mean()), float(patch.std())
        centre = ct.index_to_patient(np.array(c[::-1], float))
        if tissue == "lung" and -920 < mean < -700 and sd < 150 and patch.max() < 0:
            return centre, float(rng.uniform(-50, 50))
        if tissue == "liver" and 80 < mean < 160 and sd < 25:
            return centre, mean - float(rng.uniform(25, 60))
        if tissue == "soft tissue" and -140 < mean < -60 and sd < 35:
            return centre, float(rng.uniform(20, 60))
    return None


def make_scan(kind: str, seed: int) -> Scan:
    rng = np.random.default_rng([seed, 15])
    ct0, lab0 = background(kind, seed)
    ct, lab = ct0, lab0
    for les in [int(v) for v in np.unique(lab0.array) if v]:
        vol = float((lab.array == les).sum()) * lab.voxel_volume_mm3()
        ct, lab = grow_lesion(ct, lab, les, default_growth(rng, vol), rng)
    avoid = lab.array > 0
    truth: dict[int, dict[str, Any]] = {}
    label = 100
    extra = str(rng.choice(["lung", "liver", "soft tissue"]))
    for tissue in ("lung", "liver", "soft tissue", extra):
        # nominal sphere diameter; the lobulated lesion's measured axial diameter is ~1.2-1.5x larger
        small = rng.random() < 0.5
        diameter = float(rng.uniform(4.0, 7.5) if small else rng.uniform(8.0, 15.0))
        site = pick_site(ct, avoid, tissue, diameter / 2, rng)
        if site is None:
            continue
        centre, hu = site
        ct, lab = insert_lesion(ct, lab, label, centre, diameter / 2, hu, rng)
        avoid = lab.array > 0
        truth[label] = {"tissue": tissue, "nominal_diameter_mm": diameter, "hu": hu}
        label += 1
    cfg = SynthConfig()
    tr = random_patient_motion(rng, ct0, cfg.rotation_deg, cfg.translation_mm, cfg.elastic_mm, cfg.breathing_mm)
    grid, grid_info = _followup_grid(ct0, rng, cfg)
    fu = apply_transform(ct, tr, grid)
    fu_lab = apply_transform(lab, tr, grid, label=True)
    fu, inten = _intensity_change(fu, rng, cfg)
    for n in list(truth):
        m = fu_lab.array == n
        if not m.any():
            truth[n]["in_fov"] = False
            continue
        truth[n]["in_fov"] = True
        truth[n]["diameter_mm"] = _axial_diameter(np.argwhere(m), fu.spacing[::-1])
        truth[n]["volume_mm3"] = float(m.sum()) * fu.voxel_volume_mm3()
    info = {"grid": grid_info, "intensity": inten, "baseline_spacing_mm": ct0.spacing.tolist()}
    return Scan(f"{kind}-{seed}", ct0, fu, tr, truth, fu_lab.array, info)


def convex_warp(scan: Scan, spacing: float, cache: Path | None) -> tuple[Volume, float]:
    from config.settings import EngineSettings
    from models.registration import get_engine

    key = hashlib.sha1(scan.baseline.array.tobytes() + scan.followup.array.tobytes()).hexdigest()[:12]
    path = cache / f"convex{spacing:g}_{scan.name}_{key}.pkl" if cache else None
    if path is not None and path.exists():
        warped, secs = pickle.loads(path.read_bytes())
        return warped, secs
    engine = get_engine("convex", EngineSettings(working_spacing_mm=spacing))
    t0 = time.perf_counter()
    reg = engine.register(scan.baseline, scan.followup)
    warped = reg.warp_image(scan.baseline, default=-1024.0)
    secs = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps((warped, secs)))
    return warped, secs


def evaluate(scan: Scan, warped: Volume, opt: DetectionOptions) -> dict[str, Any]:
    tracked = (scan.fu_labels > 0) & (scan.fu_labels < 100)
    t0 = time.perf_counter()
    cands = detect_new_lesions(scan.followup, warped, tracked, opt)
    secs = time.perf_counter() - t0
    new_map = np.where(scan.fu_labels >= 100, scan.fu_labels, 0)
    near = ndi.maximum_filter(new_map, size=3)  # each new lesion, dilated by one voxel
    rows = []
    hit_labels: set[int] = set()
    false = []
    for c in cands:
        labs = {int(v) for v in np.unique(near[c.mask]) if v >= 100}
        if labs:
            hit_labels |= labs
        else:
            false.append(
                {
                    "tissue": c.tissue,
                    "diameter_mm": round(c.diameter_mm, 1),
                    "contrast_hu": round(c.contrast_hu),
                    "elongation": round(c.elongation, 2),
                    "strength": round(c.strength, 2),
                    "confidence": round(c.confidence, 2),
                    "centre_mm": [round(v, 1) for v in c.centre_mm],
                }
            )
    for n, t in scan.new_truth.items():
        if not t.get("in_fov"):
            continue
        best = [c for c in cands if (c.mask & (near == n)).any()]
        rows.append(
            {
                "scan": scan.name,
                "label": n,
                **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in t.items()},
                "found": n in hit_labels,
                "confidence": round(best[0].confidence, 2) if best else None,
                "tissue_called": best[0].tissue if best else None,
            }
        )
    return {"rows": rows, "false": false, "seconds": secs, "n_candidates": len(cands)}


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [r for res in results for r in res["rows"]]
    big = [r for r in rows if r["diameter_mm"] >= 10.0]
    small = [r for r in rows if r["diameter_mm"] < 10.0]
    per_tissue = {
        t: f"{sum(r['found'] for r in rows if r['tissue'] == t)}/{sum(r['tissue'] == t for r in rows)}"
        for t in ("lung", "liver", "soft tissue")
    }
    n_false = sum(len(res["false"]) for res in results)
    return {
        "new_lesions": len(rows),
        "sensitivity_ge10mm": sum(r["found"] for r in big) / max(len(big), 1),
        "found_ge10mm": f"{sum(r['found'] for r in big)}/{len(big)}",
        "sensitivity_5_10mm": sum(r["found"] for r in small) / max(len(small), 1),
        "found_5_10mm": f"{sum(r['found'] for r in small)}/{len(small)}",
        "found_per_tissue": per_tissue,
        "false_candidates": n_false,
        "false_per_scan": n_false / max(len(results), 1),
        "detector_seconds_per_scan": float(np.mean([res["seconds"] for res in results])),
    }


def timing_512(opt: DetectionOptions) -> dict[str, Any]:
    """Detector wall/CPU time on a 512×512×300 scan (lung1 resampled to 0.8 mm slices), prior shifted 1.5 mm."""
    ct, _ = background("lung1", 0)
    lo, hi = ct.world_bounds()
    sp = np.array([ct.spacing[0], ct.spacing[1], (hi[2] - lo[2]) / 299])
    grid = Volume(np.zeros((300, 512, 512), np.uint8), ct.origin, sp, ct.direction)
    fu = ct.resample_to(grid)
    prior = Volume(ct.array, ct.origin + np.array([1.5, -1.0, 0.5]), ct.spacing, ct.direction).resample_to(grid)
    t0, c0 = time.perf_counter(), time.process_time()
    cands = detect_new_lesions(fu, prior, None, opt)
    return {
        "shape": list(fu.shape),
        "spacing_mm": [round(v, 3) for v in sp],
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
        "candidates": len(cands),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--set", choices=sorted(SETS), default="heldout")
    ap.add_argument("--methods", default="oracle,convex")
    ap.add_argument("--spacing", type=float, default=3.0, help="convex registration working spacing (mm)")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--rows", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated scan names (development)")
    args = ap.parse_args()
    opt = DetectionOptions()
    methods = [m for m in args.methods.split(",") if m]
    t0 = time.perf_counter()
    scans = [make_scan(k, s) for k, s in SETS[args.set] if not args.only or f"{k}-{s}" in args.only.split(",")]
    synth_s = time.perf_counter() - t0
    out: dict[str, Any] = {}
    reg_seconds: list[float] = []
    all_res: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        res = []
        for scan in scans:
            if method == "oracle":
                warped = apply_transform(scan.baseline, scan.transform, scan.followup)
            else:
                warped, secs = convex_warp(scan, args.spacing, args.cache)
                reg_seconds.append(secs)
            res.append(evaluate(scan, warped, opt))
        all_res[method] = res
        out[method] = summarise(res)
    doc: dict[str, Any] = {
        "benchmark": "new_lesions",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), load {os.getloadavg()[0]:.1f}",
        "set": args.set,
        "scans": [
            {
                "name": s.name,
                "followup_spacing_mm": [round(v, 2) for v in s.followup.spacing],
                "followup_shape": list(s.followup.shape),
                "new": len([t for t in s.new_truth.values() if t.get("in_fov")]),
            }
            for s in scans
        ],
        "synthesis_seconds": synth_s,
        "registration": {"engine": "convex", "working_spacing_mm": args.spacing, "seconds_per_pair": None},
        "options": {k: v for k, v in opt.__dict__.items()},
        "methods": out,
        "targets": {
            m: {
                "sensitivity>=10mm>=0.80": s["sensitivity_ge10mm"] >= 0.8,
                "sensitivity5-10mm>=0.60": s["sensitivity_5_10mm"] >= 0.6,
                "false/scan<=1": s["false_per_scan"] <= 1.0,
            }
            for m, s in out.items()
        },
    }
    if reg_seconds:
        doc["registration"]["seconds_per_pair"] = float(np.mean(reg_seconds))
    if args.rows:
        doc["rows"] = {m: [r for res in v for r in res["rows"]] for m, v in all_res.items()}
        doc["false"] = {m: {s.name: res["false"] for s, res in zip(scans, v, strict=True)} for m, v in all_res.items()}
    if args.timing:
        doc["timing_512x512x300"] = timing_512(opt)
    print(json.dumps(doc, indent=1, default=str))


if __name__ == "__main__":
    main()
