"""Verified tracking benchmark (issue 16): a correction at follow-up k against prompting from the baseline only.

Same long synthetic series as ``bench/tracking.py`` (its patients, motion, metrics and registration wrappers are
imported from there): per patient a baseline + ``--followups`` follow-ups. For every patient, every baseline quality
and every ``k`` in ``--ks`` two arms are tracked with the product loop (``pipeline.science.tracking.track_lesions``,
propagation from the nearest annotated timepoint, default ``adaptive`` engine) and scored on the follow-ups > k:

* **a — baseline only** (today's default): every follow-up propagated from the baseline annotation;
* **b — baseline + correction at k**: the same baseline annotation plus the ground-truth masks of follow-up k given
  as that timepoint's confirmed prompts (``track_lesions(..., confirmed={k: prompts})``, same lesion labels; a lesion
  absent at k in the truth gets no confirmed prompt there), as a radiologist's corrected SEG would be adopted.

Baseline qualities: ``good`` (the ground-truth masks) and ``rough`` (a deliberately poor annotation, per lesion in
label order alternately dilated by ``--rough-dilate-mm`` or eroded by ``--rough-erode-mm`` — the deepest core is
kept when the erosion would empty it — then shifted ``--rough-shift-mm`` in a random direction (seeded by the
patient); its Dice against the truth is reported). Per arm and follow-up: Dice@25, overall Dice (misses count 0),
median |volume error|; the paired difference b − a per lesion-follow-up with its spread (SD, range, a 95 %
bootstrap interval of the mean resampling lesions) and the acceptance (``verdict``): b ≥ a on the good baseline,
b > a on the rough one.

Usage: ``.venv/bin/python bench/verified.py [--phantoms 3] [--first-seed 7] [--lung1-seed 13] [--ks 1,2,3]
[--registration oracle|convex] [--cache DIR] [--plot docs/img/verified_tracking.png]``; prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tracking import (
    Patient,
    TimedEngine,
    make_patients,
    make_registration,
    run_method,
    summarise,
    truth_prompts,
)
from lesiontrack.models.engines import build_segmentation
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.prompts import Prompt

Row = dict[str, Any]


# ---- the rough baseline annotation ----------------------------------------------------------------------------
def rough_mask(mask: Volume, grow_mm: float, shift_mm: np.ndarray) -> Volume:
    """``mask`` dilated (``grow_mm`` > 0) or eroded (< 0) by that distance, then translated by ``shift_mm`` (LPS)."""
    m = mask.array > 0
    sp = mask.spacing[::-1]
    idx = np.argwhere(m)
    pad = np.ceil((max(grow_mm, 0.0) + 2.0) / sp).astype(int)
    lo, hi = np.maximum(idx.min(0) - pad, 0), np.minimum(idx.max(0) + pad + 1, m.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    box = m[sl]
    if grow_mm >= 0:
        new = ndi.distance_transform_edt(~box, sampling=sp) <= grow_mm
    else:
        d_in = ndi.distance_transform_edt(box, sampling=sp)
        new = d_in > -grow_mm
        if not new.any():
            new = d_in >= d_in.max()
    out = np.zeros_like(m)
    out[sl] = new
    shift_ijk = np.linalg.solve(mask.direction @ np.diag(mask.spacing), shift_mm)
    moved = np.argwhere(out) + np.rint(shift_ijk[::-1]).astype(int)
    moved = moved[np.all((moved >= 0) & (moved < np.array(m.shape)), axis=1)]
    res = np.zeros(m.shape, np.uint8)
    res[tuple(moved.T)] = 1
    return mask.with_array(res)


def rough_prompts(
    p: Patient, dilate_mm: float, erode_mm: float, shift_mm: float, seed: int
) -> tuple[list[Prompt], list[dict[str, Any]]]:
    """The rough baseline annotation of ``p`` and, per lesion, what was done to it and its Dice against the truth."""
    rng = np.random.default_rng(seed)
    prompts, info = [], []
    for i, pr in enumerate(truth_prompts(p, 0, "rough baseline annotation")):
        assert pr.mask is not None
        grow = dilate_mm if i % 2 == 0 else -erode_mm
        direction = rng.normal(size=3)
        shift = shift_mm * direction / np.linalg.norm(direction)
        rough = rough_mask(pr.mask, grow, shift)
        gt, rm = pr.mask.array > 0, rough.array > 0
        info.append(
            {
                "label": pr.identity.label,
                "change": f"{'dilated' if grow > 0 else 'eroded'} {abs(grow):g} mm, shifted {shift_mm:g} mm",
                "shift_mm": [round(float(v), 2) for v in shift],
                "dice_vs_truth": float(2 * (gt & rm).sum() / (gt.sum() + rm.sum())),
                "volume_ratio": float(rm.sum() / gt.sum()),
            }
        )
        prompts.append(Prompt(pr.identity, pr.kind, mask=rough, source=pr.source))
    return prompts, info


# ---- statistics -----------------------------------------------------------------------------------------------
def paired(a: list[Row], b: list[Row], key: str, rng: np.random.Generator) -> dict[str, Any]:
    """b − a of ``key`` per lesion-follow-up present in the truth; spread and a lesion-resampled 95 % interval."""
    by_a = {(r["patient"], r["t"], r["label"]): r for r in a if r["gt_present"]}
    pairs = [(k, r[key] - by_a[k][key]) for r in b if r["gt_present"] for k in [(r["patient"], r["t"], r["label"])]]
    if not pairs:
        return {"n": 0}
    d = np.array([v for _, v in pairs])
    lesion = [(k[0], k[2]) for k, _ in pairs]
    groups = [np.array([v for (k2, v) in zip(lesion, d, strict=True) if k2 == g]) for g in sorted(set(lesion))]
    boot = []
    for _ in range(2000):
        pick = rng.integers(len(groups), size=len(groups))
        boot.append(np.concatenate([groups[i] for i in pick]).mean())
    return {
        "n": len(d),
        "lesions": len(groups),
        "mean": float(d.mean()),
        "sd": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
        "median": float(np.median(d)),
        "min": float(d.min()),
        "max": float(d.max()),
        "ci95_mean": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "b_better": int((d > 0.005).sum()) if key == "dice" else int((d < -0.005).sum()),
        "b_worse": int((d < -0.005).sum()) if key == "dice" else int((d > 0.005).sum()),
    }


def compare(a: list[Row], b: list[Row], k: int, n_fu: int, rng: np.random.Generator) -> dict[str, Any]:
    """Arms a and b on the follow-ups > k: per follow-up and over all, with the paired differences."""

    def sel(rows: list[Row], ts: range | list[int]) -> list[Row]:
        return [r for r in rows if r["t"] in ts]

    def arm(rows: list[Row]) -> dict[str, Any]:
        s = summarise(rows)
        keys = ("Dice@25", "overall_Dice", "median_abs_volume_error", "CPM@25", "vanished_correct_rate")
        return {key: s[key] for key in keys} | {"present": s["present"], "vanished": s["vanished"]}

    later = list(range(k + 1, n_fu + 1))
    per_t = {
        t: {
            "a": arm(sel(a, [t])),
            "b": arm(sel(b, [t])),
            "paired_dice": paired(sel(a, [t]), sel(b, [t]), "dice", rng),
        }
        for t in later
    }
    overall: dict[str, Any] = {
        "a": arm(sel(a, later)),
        "b": arm(sel(b, later)),
        "paired_dice": paired(sel(a, later), sel(b, later), "dice", rng),
        "paired_abs_volume_error": paired(sel(a, later), sel(b, later), "abs_volume_error", rng),
    }
    from_k = [r for r in sel(b, later) if r["propagated_from"] is not None and r["propagated_from"].endswith(f".{k}")]
    overall["b_propagated_from_k"] = f"{len(from_k)}/{len(sel(b, later))}"
    return {"per_followup": per_t, "overall": overall}


def verdict(res: dict[str, Any], quality: str, margin: float = 0.01) -> dict[str, Any]:
    """Acceptance on the follow-ups > k. Good baseline: b ≥ a (mean paired Dice ≥ 0, and no follow-up index where
    b's Dice is below a's by more than ``margin``, a tie); rough baseline: b > a (mean paired Dice > 0 with its 95 %
    interval above 0, and b's Dice above a's at every follow-up index)."""
    pd = res["overall"]["paired_dice"]
    per_t = res["per_followup"].values()
    if quality == "good":
        return {
            "mean paired Dice (b - a) >= 0": pd["mean"] >= 0.0,
            f"b >= a - {margin:g} at every follow-up index > k": all(
                v["b"]["overall_Dice"] >= v["a"]["overall_Dice"] - margin for v in per_t
            ),
        }
    return {
        "mean paired Dice (b - a) > 0, 95 % interval above 0": pd["mean"] > 0.0 and pd["ci95_mean"][0] > 0.0,
        "b > a at every follow-up index > k": all(v["b"]["overall_Dice"] > v["a"]["overall_Dice"] for v in per_t),
    }


def warped_source_dice(p: Patient, reg: Any, prompts: list[Prompt], ks: list[int]) -> dict[str, dict[str, float]]:
    """Diagnostic without segmentation: mean Dice against the truth at every follow-up t > k of the source mask
    warped onto t (``warped-only``), for the baseline annotation (arm a) and the truth at k (arm b's source)."""

    def mean_dice(src: int, masks: dict[int, Volume], ts: list[int]) -> float:
        out = []
        for t in ts:
            warp = reg.register(p.cts[src], p.cts[t]).warp_labels
            for n, m in masks.items():
                gt = p.labels[t].array == n
                if gt.any():
                    w = warp(m).array > 0
                    out.append(2 * float((w & gt).sum()) / float(w.sum() + gt.sum()))
        return float(np.mean(out)) if out else float("nan")

    base = {pr.identity.label: pr.mask for pr in prompts if pr.mask is not None}
    res = {}
    for k in ks:
        later = list(range(k + 1, len(p.cts)))
        corr = {pr.identity.label: pr.mask for pr in truth_prompts(p, k) if pr.mask is not None}
        res[f"k={k}"] = {"a (baseline)": mean_dice(0, base, later), "b (truth at k)": mean_dice(k, corr, later)}
    return res


# ---- plot -----------------------------------------------------------------------------------------------------
def plot(results: dict[str, Any], arm_a: dict[str, dict[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), sharey=True)
    for ax, (quality, by_k) in zip(np.atleast_1d(axes), results.items(), strict=True):
        ts = sorted(arm_a[quality])
        ax.plot(ts, [arm_a[quality][t] for t in ts], "ko-", lw=2, label="a: baseline only")
        for i, (k, res) in enumerate(by_k.items()):
            kt = sorted(int(t) for t in res["per_followup"])
            c = f"C{i}"
            ax.plot(kt, [res["per_followup"][t]["b"]["overall_Dice"] for t in kt], "s--", color=c, label=f"b: {k}")
            ax.axvline(int(k.split("=")[1]), color=c, lw=0.8, ls=":")
        ax.set(xlabel="follow-up index", title=f"{quality} baseline annotation", ylim=(0.4, 1.0))
        ax.set_xticks(ts)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("Dice (misses count 0)")
    np.atleast_1d(axes)[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# ---- main -----------------------------------------------------------------------------------------------------
def _arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--phantoms", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=7, help="phantom seeds first..first+phantoms-1 (held out)")
    ap.add_argument("--lung1-seed", type=int, default=13)
    ap.add_argument("--no-lung1", action="store_true")
    ap.add_argument("--followups", type=int, default=5)
    ap.add_argument("--ks", default="1,2,3", help="follow-ups at which the correction arrives (comma-separated)")
    ap.add_argument("--qualities", default="good,rough")
    ap.add_argument("--rough-dilate-mm", type=float, default=3.0)
    ap.add_argument("--rough-erode-mm", type=float, default=2.0)
    ap.add_argument("--rough-shift-mm", type=float, default=3.0)
    ap.add_argument("--registration", choices=("oracle", "convex"), default="oracle")
    ap.add_argument("--spacing", type=float, default=4.0, help="convex working spacing (mm)")
    ap.add_argument("--adam", type=int, default=40, help="convex Adam iterations")
    ap.add_argument("--cache", type=Path, default=None, help="folder caching convex registrations between runs")
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--rows", action="store_true", help="include per-lesion rows")
    ap.add_argument(
        "--warped-only",
        action="store_true",
        help="only the diagnostic: Dice of each arm's source mask warped onto the later follow-ups (no segmentation)",
    )
    args = ap.parse_args()
    if not all(1 <= int(k) < args.followups for k in args.ks.split(",")):
        ap.error(f"every k must lie in 1..{args.followups - 1}")
    return args


def main() -> None:
    args = _arguments()
    ks = [int(v) for v in args.ks.split(",")]
    qualities = args.qualities.split(",")

    load_start = os.getloadavg()
    t0 = time.perf_counter()
    patients = make_patients(args.phantoms, args.first_seed, args.followups, None if args.no_lung1 else args.lung1_seed)
    synth_s = time.perf_counter() - t0
    reg = make_registration(patients, args.registration == "oracle", args.spacing, args.adam, args.cache)
    seg = TimedEngine(build_segmentation("adaptive"))
    rows: dict[str, dict[str, list[Row]]] = {q: {} for q in qualities}
    rough_info: dict[str, list[dict[str, Any]]] = {}
    warped: dict[str, dict[str, Any]] = {q: {} for q in qualities}
    for pi, p in enumerate(patients):
        for q in qualities:
            if q == "good":
                prompts = truth_prompts(p)
            else:
                prompts, rough_info[p.name] = rough_prompts(
                    p, args.rough_dilate_mm, args.rough_erode_mm, args.rough_shift_mm, 1000 + pi
                )
            warped[q][p.name] = warped_source_dice(p, reg, prompts, ks)
            if args.warped_only:
                continue
            rows[q].setdefault("a", []).extend(run_method(p, reg, seg, "annotation", prompts))
            for k in ks:
                conf = {k: truth_prompts(p, k, f"correction at follow-up {k}")}
                rows[q].setdefault(f"k={k}", []).extend(run_method(p, reg, seg, "annotation", prompts, conf))
            print(f"{time.strftime('%H:%M:%S')} {p.name} {q} done", file=sys.stderr, flush=True)

    if args.warped_only:
        print(json.dumps({"command": " ".join(["bench/verified.py", *sys.argv[1:]]), "warped_source_dice": warped}))
        return
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {}
    per_patient: dict[str, Any] = {}
    for q in qualities:
        results[q] = {}
        for k in ks:
            res = compare(rows[q]["a"], rows[q][f"k={k}"], k, args.followups, rng)
            res["acceptance"] = verdict(res, q)
            results[q][f"k={k}"] = res
            for p in patients:
                a = [r for r in rows[q]["a"] if r["patient"] == p.name]
                b = [r for r in rows[q][f"k={k}"] if r["patient"] == p.name]
                o = compare(a, b, k, args.followups, rng)["overall"]
                per_patient.setdefault(q, {}).setdefault(f"k={k}", {})[p.name] = {
                    "a_overall_Dice": o["a"]["overall_Dice"],
                    "b_overall_Dice": o["b"]["overall_Dice"],
                    "paired_dice_mean": o["paired_dice"]["mean"],
                }
    arm_a = {
        q: {
            t: summarise([r for r in rows[q]["a"] if r["t"] == t])["overall_Dice"] for t in range(1, args.followups + 1)
        }
        for q in qualities
    }
    acceptance = {q: all(all(v.values()) for v in (results[q][f"k={k}"]["acceptance"] for k in ks)) for q in qualities}
    doc: dict[str, Any] = {
        "benchmark": "verified tracking (issue 16): correction at follow-up k vs baseline only",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared)",
        "load_average_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        "command": " ".join(["bench/verified.py", *sys.argv[1:]]),
        "patients": [p.name for p in patients],
        "lesions": sum(len([v for v in np.unique(p.labels[0].array) if v > 0]) for p in patients),
        "timepoints_per_patient": args.followups + 1,
        "ks": ks,
        "registration": args.registration
        + ("" if args.registration == "oracle" else f" ({args.spacing:g} mm, Adam {args.adam})"),
        "segmentation": "adaptive",
        "rough_baseline": {
            "rule": f"per lesion in label order alternately dilated {args.rough_dilate_mm:g} mm / eroded "
            f"{args.rough_erode_mm:g} mm, then shifted {args.rough_shift_mm:g} mm in a random direction",
            "mean_dice_vs_truth": float(np.mean([i["dice_vs_truth"] for v in rough_info.values() for i in v]))
            if rough_info
            else None,
            "per_patient": rough_info,
        },
        "arm_a_overall_Dice_per_followup": arm_a,
        "warped_source_dice": warped,
        "results": results,
        "per_patient": per_patient,
        "acceptance_holds": acceptance,
        "seconds": {
            "synthesis": synth_s,
            "total": time.perf_counter() - t0,
            "registration_pairs": len(reg.seconds),
            "seconds_per_pair": float(np.mean(reg.seconds)) if reg.seconds else None,
            "segment_calls": len(seg.seconds),
            "seconds_per_segment": float(np.mean(seg.seconds)) if seg.seconds else None,
        },
    }
    if args.rows:
        doc["rows"] = rows
    if args.plot is not None:
        plot(
            results,
            arm_a,
            args.plot,
            f"{len(patients)} patients, {doc['lesions']} lesions, {args.followups + 1} timepoints, "
            f"registration {args.registration}",
        )
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
