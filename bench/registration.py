"""Registration benchmark: TRE / folding / wall time / peak memory of convex (ours), simpleitk and PyPI convexadam.

Pairs are synthetic follow-ups of the real CTs in ../shared/data/real (lung1 chest CT, TotalSegmentator body
CT) made with ``synthetic.transforms``: repositioning (±5°, ±20 mm), elastic motion (peak 10 mm), noise
and contrast change, a different grid (spacing) and a cropped z field of view. Landmarks are exact pairs
(follow-up point → analytic baseline point). Every (pair, method) runs in a fresh subprocess so peak RSS is
that method's own. Prints one JSON document (per-run rows + per-method summary).

    .venv/bin/python bench/registration.py                       # all pairs, all methods
    .venv/bin/python bench/registration.py --pairs lung1:1 --methods convex,convexadam
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("LESIONTRACK_SHARED_DATA", REPO.parent / "shared" / "data"))
SOURCES = {"lung1": "real/lung1/lung1_image.nrrd", "body_ct": "real/body_ct/ct.nii.gz"}
DEFAULT_PAIRS = ["lung1:1", "lung1:2", "body_ct:1", "body_ct:2"]
METHODS = ["convex", "simpleitk", "convexadam"]


def make_pair(source: str, seed: int):
    """(baseline, follow-up, transform, landmarks_followup, landmarks_baseline) — deterministic per seed."""
    from lesiontrack.models.imaging.volume import Volume
    from lesiontrack.synthetic.transforms import apply_transform, random_patient_motion

    base = Volume.read(str(DATA / SOURCES[source]))
    base = base.with_array(np.clip(base.array, -1024, 3071).astype(np.int16))
    rng = np.random.default_rng(1000 + seed)
    tr = random_patient_motion(rng, base, rotation_deg=5.0, translation_mm=20.0, elastic_mm=10.0)
    # follow-up grid: identity direction, other spacing, z field of view cropped by 15-25 % at one end
    lo, hi = base.world_bounds()
    sp = np.array([0.8, 0.8, 2.5]) if source == "lung1" else np.array([2.5, 2.5, 2.0])
    ext = hi - lo
    crop = float(rng.uniform(0.15, 0.25)) * ext[2]
    z0 = lo[2] + (crop if rng.random() < 0.5 else 0.0)
    n = np.floor(np.array([ext[0], ext[1], ext[2] - crop]) / sp).astype(int) + 1
    grid = Volume(np.zeros((n[2], n[1], n[0]), np.uint8), np.array([lo[0], lo[1], z0]), sp)
    fu = apply_transform(base, tr, grid)
    scale = float(rng.uniform(0.9, 1.1))
    noisy = (fu.array.astype(np.float32) + 1024.0) * scale - 1024.0 + rng.normal(0, 12.0, fu.shape)
    fu = fu.with_array(np.clip(np.rint(noisy), -1024, 3071).astype(np.int16))
    # exact landmark pairs: follow-up voxels inside the body (lungs included) with the partner inside the baseline
    from scipy import ndimage

    body = ndimage.binary_fill_holes(fu.array > -400)
    body = np.stack([ndimage.binary_fill_holes(s) for s in body])
    cand = np.argwhere(body)
    cand = cand[rng.choice(len(cand), size=min(len(cand), 6000), replace=False)]
    y = fu.index_to_patient(cand[:, ::-1] + rng.uniform(-0.5, 0.5, (len(cand), 3)))
    x = tr.followup_to_baseline(y)
    idx = base.patient_to_index(x)
    ok = np.all((idx >= 0) & (idx <= np.array(base.size_ijk) - 1), axis=1)
    return base, fu, tr, y[ok][:1000], x[ok][:1000]


CACHE = Path(os.environ.get("BENCH_CACHE", "/tmp/lesiontrack-bench-registration"))


def cached_pair(source: str, seed: int):
    """``make_pair`` memoised on disk (building a follow-up through the analytic transform takes a while)."""
    from lesiontrack.models.imaging.volume import Volume

    d = CACHE / f"{source}-{seed}"
    if not (d / "done").exists():
        base, fu, _, y, x = make_pair(source, seed)
        d.mkdir(parents=True, exist_ok=True)
        base.write(str(d / "baseline.nrrd"))
        fu.write(str(d / "followup.nrrd"))
        np.savez(d / "landmarks.npz", y=y, x=x)
        (d / "done").write_text("ok")
    lm = np.load(d / "landmarks.npz")
    return Volume.read(str(d / "baseline.nrrd")), Volume.read(str(d / "followup.nrrd")), None, lm["y"], lm["x"]


def _convexadam(base, fu, spacing: float):
    """PyPI convexadam on both scans resampled (world-aligned) to the same isotropic grid; returns a point map."""
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    from lesiontrack.models.registration.grids import working_grid

    grid = working_grid(fu, spacing, multiple=1)
    f = fu.resample_to(grid).array.astype(np.float32)
    m = base.resample_to(grid, default=-1024.0).array.astype(np.float32)
    t = time.perf_counter()
    disp = convex_adam_pt(f, m, device=torch.device("cpu"))  # (K, J, I, 3): (dk, dj, di), voxel units
    wall = time.perf_counter() - t
    from scipy import ndimage

    def to_baseline(y: np.ndarray) -> np.ndarray:
        ijk = grid.patient_to_index(y)
        coords = ijk[:, ::-1].T  # k, j, i
        d = np.stack([ndimage.map_coordinates(disp[..., c], coords, order=1, mode="nearest") for c in range(3)], 1)
        return grid.index_to_patient(ijk + d[:, ::-1])

    from lesiontrack.models.registration.field import jacobian_stats

    fold, _ = jacobian_stats(np.ascontiguousarray(np.moveaxis(disp[..., ::-1], -1, 0)).astype(np.float32))
    return to_baseline, wall, fold, {"grid": list(grid.size_ijk)}


def worker(source: str, seed: int, method: str, spacing: float) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    base, fu, _, y, x = cached_pair(source, seed)
    row: dict = {
        "pair": f"{source}:{seed}",
        "method": method,
        "n_landmarks": len(y),
        "initial_tre_mean": float(np.linalg.norm(x - y, axis=1).mean()),
        "baseline_grid": list(base.size_ijk),
        "followup_grid": list(fu.size_ijk),
    }
    if method == "convexadam":
        to_baseline, wall, fold, extra = _convexadam(base, fu, spacing)
        row.update(extra)
    else:
        from lesiontrack.config.settings import EngineSettings
        from lesiontrack.models.engines import build_registration

        eng = build_registration(method, EngineSettings(working_spacing_mm=spacing), device="cpu")
        t = time.perf_counter()
        reg = eng.register(base, fu)
        wall = time.perf_counter() - t
        to_baseline = reg.map_points_to_baseline
        fold = reg.quality.folding_fraction
        row.update(
            {
                "stages": reg.quality.stage_seconds,
                "ncc_before": reg.quality.similarity_before,
                "ncc_after": reg.quality.similarity_after,
                "grid": reg.quality.extra.get("working_grid"),
            }
        )
    err = np.linalg.norm(to_baseline(y) - x, axis=1)
    row.update(
        {
            "tre_mean": float(err.mean()),
            "tre_median": float(np.median(err)),
            "tre_p95": float(np.percentile(err, 95)),
            "folding_fraction": float(fold),
            "wall_s": wall,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        }
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default=",".join(DEFAULT_PAIRS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--spacing", type=float, default=2.0, help="working resolution (mm) for every method")
    ap.add_argument("--worker", nargs=3, metavar=("SOURCE", "SEED", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    if args.worker:
        src, seed, method = args.worker
        print(json.dumps(worker(src, int(seed), method, args.spacing)))
        return
    rows = []
    for pair in args.pairs.split(","):
        src, seed = pair.split(":")
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--spacing", str(args.spacing), "--worker", src, seed, method]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if out.returncode != 0:
                rows.append({"pair": pair, "method": method, "error": out.stderr.strip().splitlines()[-1:]})
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    summary: dict[str, Any] = {}
    for method in args.methods.split(","):
        ok = [r for r in rows if r["method"] == method and "error" not in r]
        if not ok:
            continue
        summary[method] = {
            k: float(np.mean([r[k] for r in ok]))
            for k in ("tre_mean", "tre_median", "tre_p95", "folding_fraction", "wall_s", "peak_rss_mb")
        }
        summary[method]["tre_p95_max"] = float(max(r["tre_p95"] for r in ok))
        summary[method]["pairs"] = len(ok)
    if "convex" in summary and "convexadam" in summary:
        ratios = {}
        for p in args.pairs.split(","):
            a = [r for r in rows if r["pair"] == p and r["method"] == "convex" and "error" not in r]
            b = [r for r in rows if r["pair"] == p and r["method"] == "convexadam" and "error" not in r]
            if a and b:
                ratios[p] = a[0]["wall_s"] / b[0]["wall_s"]
        summary["wall_ratio_convex_vs_convexadam"] = {"per_pair": ratios, "mean": float(np.mean(list(ratios.values())))}
    doc = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": int(os.environ.get("BENCH_THREADS", "2")),
            "load_avg_at_end": os.getloadavg(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "spacing_mm": args.spacing,
        "rows": rows,
        "summary": summary,
    }
    text = json.dumps(doc, indent=1)
    if args.json_out:
        args.json_out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
