"""Tracking benchmark on synthetic longitudinal patients; prints one JSON document.

Patients: digital phantoms (synthetic.phantom, 6 lesions each: solid / part-solid / spiculated / juxtapleural
lung nodules, low-contrast liver lesions, lymph nodes) and the real chest CT ../shared/data/real/lung1 (its real
tumour + inserted nodules). Each patient gets two follow-ups: every lesion grows, stays or shrinks (radius factor,
by signed distance on its real shape; removed tissue is in-painted from the surroundings), some vanish, then the
whole CT moves by a random exact patient motion (rotation, translation, elastic; synthetic.transforms) and gets
fresh noise. Ground truth = the evolved labels moved by the same exact transform.

Methods (same run, same registrations): ``adaptive`` (default engine, convex registration), ``warped-only``
(convex registration, warped prior mask as the result) and ``no-registration`` (adaptive engine, masks carried in
patient coordinates). Metrics over lesion × follow-up: CPM@25 (non-empty prediction with centroid ≤ 25 mm from the
truth, LesionLocator), Dice@25 (mean Dice of those), MED (mean centroid distance of those, mm, LinGuinE), overall Dice
(misses count 0), vanished-correct rate (truth gone → prediction empty), segmentation seconds per lesion.

Usage: ``.venv/bin/python bench/tracking.py [--phantoms 3] [--no-lung1] [--spacing 3.0] [--adam 40]``
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.imaging.volume import Volume
from models.segmentation.base import get_engine
from models.segmentation.prompts import LesionIdentity, Prompt, PromptKind
from pipeline.lesions import LesionStatus, Timepoint
from pipeline.tracking import NoRegistrationEngine, track_lesions
from synthetic.transforms import apply_transform, random_patient_motion

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass
class Patient:
    name: str
    cts: list[Volume]
    labels: list[Volume]  # ground truth per timepoint (label = lesion number)
    kinds: dict[int, str] = field(default_factory=dict)
    transforms: list[Any] = field(default_factory=list)  # exact follow-up → baseline motion per timepoint


# ---- synthesis ------------------------------------------------------------------------------------------------
def evolve(ct: Volume, labels: Volume, factors: dict[int, float], rng: np.random.Generator) -> tuple[Volume, Volume]:
    """Grow / shrink / remove each lesion by a radius factor on its own shape; in-paint removed tissue."""
    img = ct.array.astype(np.float32).copy()
    lab = labels.array.copy()
    sp = ct.spacing[::-1]
    for n, f in factors.items():
        m = labels.array == n
        if not m.any():
            continue
        idx = np.argwhere(m)
        r_eq = (3 * m.sum() * np.prod(sp) / (4 * np.pi)) ** (1 / 3)
        pad = np.ceil((max(f - 1.0, 0.0) * r_eq + 8.0) / sp).astype(int)
        lo, hi = np.maximum(idx.min(0) - pad, 0), np.minimum(idx.max(0) + pad + 1, m.shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        mm = m[sl]
        sub = img[sl]
        others = (labels.array[sl] > 0) & ~mm
        d_out = ndi.distance_transform_edt(~mm, sampling=sp)
        d_in = ndi.distance_transform_edt(mm, sampling=sp)
        sd = d_out - d_in
        new = (sd <= (f - 1.0) * r_eq) if f > 0 else np.zeros_like(mm)
        new &= ~others & (sub > -980)  # never into another lesion or outside the body
        vals = sub[mm & (d_in >= min(1.5, d_in.max()))]
        grow = new & ~mm
        if grow.any():
            sub[grow] = rng.choice(vals, int(grow.sum())) if vals.size else float(np.median(sub[mm]))
        gone = mm & ~new
        if gone.any():
            ring = ~mm & ~others & (d_out > 3.0)  # beyond the blurred edge: no partial-volume residue
            _, ind = ndi.distance_transform_edt(~ring, sampling=sp, return_indices=True)
            src = tuple(i[gone] for i in ind)
            sub[gone] = sub[src] + rng.normal(0, 6.0, int(gone.sum()))
        lab_sub = lab[sl]
        lab_sub[mm & ~new] = 0
        lab_sub[new] = n
    return ct.with_array(np.rint(img).astype(np.int16)), labels.with_array(lab)


def follow_ups(name: str, ct: Volume, labels: Volume, rng: np.random.Generator, kinds: dict[int, str]) -> Patient:
    ids = [int(v) for v in np.unique(labels.array) if v > 0]
    f1, f2 = {}, {}
    for n in ids:
        course = rng.choice(["grow", "stable", "shrink", "vanish"], p=[0.4, 0.2, 0.25, 0.15])
        if course == "grow":
            a = rng.uniform(1.15, 1.3)
            f1[n], f2[n] = a, a * rng.uniform(1.1, 1.3)
        elif course == "stable":
            f1[n], f2[n] = rng.uniform(0.95, 1.05), rng.uniform(0.95, 1.05)
        elif course == "shrink":
            f1[n], f2[n] = rng.uniform(0.75, 0.9), rng.uniform(0.55, 0.75)
        else:
            f1[n], f2[n] = rng.uniform(0.6, 0.8), 0.0
    cts, labs, trs = [ct], [labels], [None]
    for fac in (f1, f2):
        e_ct, e_lab = evolve(ct, labels, fac, rng)
        tr = random_patient_motion(rng, ct, rotation_deg=3.0, translation_mm=8.0, elastic_mm=4.0)
        fu = apply_transform(e_ct, tr, ct)
        noisy = fu.array.astype(np.float32) + rng.normal(0, 6.0, fu.shape).astype(np.float32)
        cts.append(fu.with_array(np.rint(noisy).astype(np.int16)))
        labs.append(apply_transform(e_lab, tr, ct, label=True))
        trs.append(tr)
    return Patient(name, cts, labs, kinds, trs)


def phantom_patient(seed: int) -> Patient:
    from synthetic.phantom import make_phantom

    ph = make_phantom(seed=seed)
    kinds = {
        info.label: info.kind + (f" ({info.params['contrast_hu']:.0f} HU)" if "contrast_hu" in info.params else "")
        for info in ph.lesion_info
    }
    return follow_ups(
        f"phantom{seed}",
        ph.ct,
        ph.lesions.with_array(ph.lesions.array.astype(np.uint8)),
        np.random.default_rng(100 + seed),
        kinds,
    )


def lung1_patient(seed: int = 7) -> Patient | None:
    img_p, lab_p = SHARED / "real/lung1/lung1_image.nrrd", SHARED / "real/lung1/lung1_label.nrrd"
    if not img_p.exists():
        return None
    ct, lab = Volume.read(str(img_p)), Volume.read(str(lab_p))
    lab = lab.resample_to(ct, label=True) if not lab.same_grid(ct) else lab
    rng = np.random.default_rng(seed)
    c = np.argwhere(lab.array > 0).mean(0).astype(int)
    half = 128
    j0, i0 = max(0, min(c[1] - half, ct.shape[1] - 2 * half)), max(0, min(c[2] - half, ct.shape[2] - 2 * half))
    sl = (slice(None), slice(j0, j0 + 2 * half), slice(i0, i0 + 2 * half))
    origin = ct.index_to_patient(np.array([i0, j0, 0], float))
    ct = Volume(np.ascontiguousarray(ct.array[sl]).astype(np.int16), origin, ct.spacing, ct.direction)
    labels = (lab.array[sl] > 0).astype(np.uint8)
    # insert two synthetic solid nodules deep inside the lung
    img = ct.array.astype(np.float32)
    sp = ct.spacing[::-1]
    lung = ndi.binary_opening(img < -600, iterations=2)
    depth = ndi.distance_transform_edt(lung, sampling=sp)
    kinds = {1: "real lung tumour"}
    k, j, i = np.meshgrid(*(np.arange(s) for s in img.shape), indexing="ij")
    pts = np.stack([k * sp[0], j * sp[1], i * sp[2]], -1)
    for n, r in ((2, 7.0), (3, 5.5)):
        cand = np.argwhere((depth > r + 6) & (ndi.distance_transform_edt(labels == 0, sampling=sp) > 25))
        if cand.size == 0:
            break
        cc = cand[rng.integers(len(cand))] * sp
        dist = np.linalg.norm(pts - cc, axis=-1)
        w = np.clip(r + 0.5 - dist, 0, 1).astype(np.float32)
        img = img * (1 - w) + (25.0 + rng.normal(0, 12.0, img.shape).astype(np.float32)) * w
        labels[dist <= r] = n
        kinds[n] = "inserted lung nodule"
    ct = ct.with_array(np.rint(img).astype(np.int16))
    return follow_ups("lung1", ct, ct.with_array(labels), rng, kinds)


# ---- evaluation -----------------------------------------------------------------------------------------------
class CachedRegistration:
    """Registers each (previous, current) pair once; shared by the methods that use registration."""

    def __init__(self, engine: Any, patients: list[Patient], disk: Path | None = None, tag: str = "") -> None:
        self.engine, self.name, self.version = engine, engine.name, engine.version
        self.cache: dict[tuple[int, int], Any] = {}
        self.seconds: list[float] = []
        import hashlib

        # names carry a content hash: a changed phantom or CT never reuses a stale registration
        self.names = {
            id(ct): f"{p.name}_t{t}_{hashlib.sha1(ct.array.tobytes()).hexdigest()[:10]}"
            for p in patients
            for t, ct in enumerate(p.cts)
        }
        self.disk, self.tag = disk, tag

    def register(self, baseline: Volume, followup: Volume) -> Any:
        import pickle

        key = (id(baseline), id(followup))
        if key in self.cache:
            return self.cache[key]
        path = None
        if self.disk is not None:
            path = self.disk / f"{self.tag}_{self.names[key[0]]}_to_{self.names[key[1]]}.pkl"
            if path.exists():
                self.cache[key], secs = pickle.loads(path.read_bytes())
                self.seconds.append(secs)
                return self.cache[key]
        t0 = time.perf_counter()
        self.cache[key] = self.engine.register(baseline, followup)
        self.seconds.append(time.perf_counter() - t0)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(pickle.dumps((self.cache[key], self.seconds[-1])))
        return self.cache[key]


class TimedEngine:
    def __init__(self, engine: Any) -> None:
        self.engine, self.name, self.version = engine, engine.name, engine.version
        self.seconds: list[float] = []

    def segment(self, image: Volume, prompt: Prompt, reference: Any = None) -> Volume:
        t0 = time.perf_counter()
        out = self.engine.segment(image, prompt, reference)
        self.seconds.append(time.perf_counter() - t0)
        return out


class OracleRegistration:
    """The exact synthetic motion as a registration (upper bound: isolates segmentation from registration error)."""

    name, version = "oracle", "1.0"

    def __init__(self, patients: list[Patient]) -> None:
        self.by_id = {id(ct): (p, t) for p in patients for t, ct in enumerate(p.cts)}
        self.cache: dict[tuple[int, int], Any] = {}

    def register(self, baseline: Volume, followup: Volume) -> Any:
        from pipeline.tracking import IdentityRegistration

        key = (id(baseline), id(followup))
        if key in self.cache:
            return self.cache[key]
        (p, a), (_, b) = self.by_id[id(baseline)], self.by_id[id(followup)]
        reg = IdentityRegistration(baseline, followup)
        reg.engine = "oracle"

        g = followup
        k, j, i = np.meshgrid(*(np.arange(n) for n in g.shape), indexing="ij")
        pts = g.index_to_patient(np.stack([i, j, k], -1).reshape(-1, 3).astype(float))
        if p.transforms[b] is not None:
            pts = p.transforms[b].followup_to_baseline(pts)
        if p.transforms[a] is not None:
            pts = p.transforms[a].baseline_to_followup(pts)
        idx = np.rint(baseline.patient_to_index(pts)).astype(int)[:, ::-1]
        ok = np.all((idx >= 0) & (idx < np.array(baseline.shape)), axis=1)
        del pts

        def warp_labels(labels: Volume) -> Volume:
            out = np.zeros(len(idx), labels.array.dtype)
            out[ok] = labels.array[tuple(idx[ok].T)]
            return g.with_array(out.reshape(g.shape))

        reg.warp_labels = warp_labels  # type: ignore[method-assign,assignment]  # the bench swaps in its cached warp
        self.cache[key] = reg
        return reg


def centroid(mask: np.ndarray, grid: Volume) -> np.ndarray | None:
    idx = np.argwhere(mask)
    return None if idx.size == 0 else grid.index_to_patient(idx[:, ::-1].mean(0))


def run_method(p: Patient, reg: Any, seg: TimedEngine) -> list[dict[str, Any]]:
    tps = [Timepoint(f"{p.name}.{t}", ct) for t, ct in enumerate(p.cts)]
    prompts = [
        Prompt(
            LesionIdentity(f"2.25.{n}", f"L{n}", n),
            PromptKind.MASK,
            mask=p.labels[0].with_array((p.labels[0].array == n).astype(np.uint8)),
        )
        for n in sorted(int(v) for v in np.unique(p.labels[0].array) if v > 0)
    ]
    track_lesions(tps, prompts, source_index=0, registration=reg, segmentation=seg)
    rows = []
    for t in range(1, len(tps)):
        gt_all = p.labels[t].array
        for les in tps[t].lesions:
            n = les.identity.label
            gt = gt_all == n
            pred = les.mask.array > 0
            row: dict[str, Any] = {
                "patient": p.name,
                "t": t,
                "label": n,
                "kind": p.kinds.get(n, ""),
                "gt_present": bool(gt.any()),
                "pred_present": les.status is LesionStatus.PRESENT,
                "gt_voxels": int(gt.sum()),
                "pred_voxels": int(pred.sum()),
            }
            if gt.any():
                s = gt.sum() + pred.sum()
                row["dice"] = float(2 * (gt & pred).sum() / s)
                cg, cp = centroid(gt, p.cts[t]), centroid(pred, p.cts[t])
                row["centre_error_mm"] = None if cp is None else float(np.linalg.norm(cg - cp))
            rows.append(row)
    return rows


def summarise(rows: list[dict[str, Any]], seg_seconds: list[float]) -> dict[str, Any]:
    present = [r for r in rows if r["gt_present"]]
    gone = [r for r in rows if not r["gt_present"]]
    matched = [
        r
        for r in present
        if r["pred_present"] and r.get("centre_error_mm") is not None and r["centre_error_mm"] <= 25.0
    ]
    return {
        "lesion_timepoints": len(rows),
        "present": len(present),
        "vanished": len(gone),
        "CPM@25": len(matched) / max(len(present), 1),
        "Dice@25": float(np.mean([r["dice"] for r in matched])) if matched else 0.0,
        "MED_mm": float(np.mean([r["centre_error_mm"] for r in matched])) if matched else None,
        "median_ED_mm": float(np.median([r["centre_error_mm"] for r in matched])) if matched else None,
        "overall_Dice": float(np.mean([r["dice"] for r in present])) if present else 0.0,
        "vanished_correct_rate": (sum(not r["pred_present"] for r in gone) / len(gone)) if gone else None,
        "false_vanished": sum(not r["pred_present"] for r in present),
        "seconds_per_lesion": float(np.mean(seg_seconds)) if seg_seconds else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phantoms", type=int, default=3)
    ap.add_argument(
        "--first-seed",
        type=int,
        default=1,
        help="phantom seeds first..first+phantoms-1 (a held-out set: seeds the engine was not tuned on)",
    )
    ap.add_argument("--no-lung1", action="store_true")
    ap.add_argument("--spacing", type=float, default=3.0, help="registration working spacing (mm)")
    ap.add_argument("--adam", type=int, default=40, help="registration Adam iterations")
    ap.add_argument("--rows", action="store_true", help="include per-lesion rows")
    ap.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="folder caching registrations between runs (the synthesis is seeded, so pairs repeat)",
    )
    ap.add_argument("--oracle", action="store_true", help="also run with the exact synthetic motion as registration")
    ap.add_argument("--skip-convex", action="store_true", help="development: skip the convex-registration methods")
    args = ap.parse_args()

    from models.registration.convex import ConvexEngine, ConvexParams

    t0 = time.perf_counter()
    patients = [phantom_patient(s) for s in range(args.first_seed, args.first_seed + args.phantoms)]
    if not args.no_lung1:
        lp = lung1_patient()
        if lp is not None:
            patients.append(lp)
    synth_s = time.perf_counter() - t0
    reg = CachedRegistration(
        ConvexEngine(ConvexParams(working_spacing_mm=args.spacing, adam_iterations=args.adam)),
        patients,
        args.cache,
        f"convex{args.spacing:g}mm_adam{args.adam}",
    )
    methods: dict[str, tuple[Any, str]] = (
        {} if args.skip_convex else {"adaptive": (reg, "adaptive"), "warped-only": (reg, "warped-prompt")}
    )
    methods["no-registration"] = (NoRegistrationEngine(), "adaptive")
    if args.oracle:
        oracle = OracleRegistration(patients)
        methods["oracle-registration adaptive"] = (oracle, "adaptive")
        methods["oracle-registration warped-only"] = (oracle, "warped-prompt")
    results: dict[str, Any] = {}
    all_rows: dict[str, list[dict[str, Any]]] = {}
    for name, (r, eng) in methods.items():
        seg = TimedEngine(get_engine(eng))
        rows = [row for p in patients for row in run_method(p, r, seg)]
        all_rows[name] = rows
        results[name] = summarise(rows, seg.seconds)
    a = results.get("adaptive") or results.get("oracle-registration adaptive") or results["no-registration"]
    w = results.get("warped-only") or results.get("oracle-registration warped-only") or a
    doc = {
        "benchmark": "tracking",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPU cores (shared)",
        "patients": [p.name for p in patients],
        "lesions": sum(len([v for v in np.unique(p.labels[0].array) if v > 0]) for p in patients),
        "followups_per_patient": 2,
        "registration": {
            "engine": "convex",
            "working_spacing_mm": args.spacing,
            "adam_iterations": args.adam,
            "pairs": len(reg.seconds),
            "seconds_per_pair": float(np.mean(reg.seconds)) if reg.seconds else None,
        },
        "synthesis_seconds": synth_s,
        "methods": results,
        "dice_points_above_warped_only": 100.0 * (a["overall_Dice"] - w["overall_Dice"]),
        "targets": {
            "CPM@25>=0.90": a["CPM@25"] >= 0.90,
            "Dice@25>=0.80": a["Dice@25"] >= 0.80,
            "MED<=3mm": a["MED_mm"] is not None and a["MED_mm"] <= 3.0,
            ">=5 Dice points above warped-only": a["overall_Dice"] - w["overall_Dice"] >= 0.05,
        },
    }
    if args.rows:
        doc["rows"] = all_rows
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
