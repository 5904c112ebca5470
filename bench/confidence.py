"""Per-lesion confidence benchmark: does the review flag find the lesions whose segmentation failed? Prints JSON.

Reuses the long synthetic series of ``bench/tracking.py`` (digital phantoms with 6 lesions each and the real chest CT
``real/lung1`` with inserted nodules; every lesion follows a course of growth / shrinkage / response / stable /
vanish over ``--followups`` follow-ups, each follow-up under an exact random patient motion with a table shift) and
adds the failures a deployed tracker meets, so that some results are bad (Dice < 0.5):

* **rough prompts** — about a third of the baseline annotations are replaced by a rough sphere (radius ×0.6–1.6 of
  the lesion's, centre displaced by 0.3–0.7 radii), as from a quick click-and-drag;
* **misregistration after large motion** — about a third of the follow-ups get a registration that missed part
  of the motion: the exact synthetic motion composed with a smooth local error (Gaussian bump of 5–14 mm, width
  15–35 mm) centred on one of the patient's lesions;
* **abutting structures** — about a third of the lesions get a lesion-like structure touching them (a blob of the
  lesion's own density, radius ×0.7–1.2 of the lesion's) from some follow-up on; the truth is the lesion alone.

Follow-ups are 8 weeks apart. Ground truth per lesion-follow-up: Dice of the result against the moved, evolved
label (a lesion reported vanished while present counts Dice 0). The ROC separates "failed" (Dice < 0.5) from
"good" (Dice >= 0.8) results by confidence; lesions truly gone are reported apart (no Dice).

Issue 29: each row also carries the truth's and the reported volume change against the baseline, and the flag
without the two signals issue 29 added (``review_before``, from the same evidence: the segmentation does not depend
on the confidence); ``at_threshold.before_vs_now`` counts both, including the results whose reported change goes
the wrong way (truth changed by at least 20 % one way, the report the other).

Registration is the exact motion (plus the injected error), so a pair costs milliseconds; the segmentation engine is
the default ``adaptive``; the confidence is :func:`pipeline.science.confidence.assess_lesion`, computed by the tracking
loop;
each row (``--rows``) carries the raw ``evidence`` it was scored from
(:func:`pipeline.science.confidence.measure_lesion`),
so a change of :func:`pipeline.science.confidence.combine` can be evaluated on saved runs without re-segmenting.

Usage: ``.venv/bin/python bench/confidence.py [--set heldout|tune] [--seeds 44,45,46] [--lung1-seed 17]
[--no-lung1] [--followups 5] [--rows] [--plot PNG]``; ``--plot PNG --plot-runs A.json B.json ...`` overlays the ROC
curves of saved outputs instead of running. Seed sets (docs/benchmarks.md): tune = phantoms 31–32 + lung1 seed 3,
A = 41–43 + 13 (``--set heldout``), B = 44–46 without lung1, C = 51–53 + 17 — all four looked at and used to tune
the revised signals — and the held-out D = 61–63 + 23, E = 71–73 + 29, run once with the revised code fixed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tracking import (
    Patient,
    centroid,
    exact_maps,
    lung1_patient,
    phantom_patient,
    truth_prompts,
    warp_labels_near,
)
from lesiontrack.models.engines import build_segmentation
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.registration.identity import IdentityRegistration
from lesiontrack.pipeline.science.confidence import ConfidenceRules, Evidence, combine, measure_lesion
from lesiontrack.pipeline.science.lesions import LesionStatus, Timepoint
from lesiontrack.pipeline.science.tracking import TrackingOptions, track_lesions

EVIDENCE: dict[int, dict[str, Any]] = {}  # id(LesionConfidence) -> the raw evidence it was scored from
SETS = {"tune": ([31, 32], 3), "heldout": ([41, 42, 43], 13)}


# ---- failure injection ----------------------------------------------------------------------------------------
class Bump:
    """A smooth local registration error: follow-up point y is mapped as if it were at y + e(y)."""

    def __init__(self, centre: np.ndarray, amplitude: np.ndarray, sigma_mm: float) -> None:
        self.centre, self.amplitude, self.sigma = centre, amplitude, sigma_mm

    def __call__(self, y: np.ndarray) -> np.ndarray:
        w = np.exp(-0.5 * np.sum((y - self.centre) ** 2, axis=-1) / self.sigma**2)
        return y + w[..., None] * self.amplitude


def rough_prompt(label: np.ndarray, grid: Volume, rng: np.random.Generator) -> np.ndarray:
    """A sphere of the wrong size, off centre: a rough annotation of the lesion ``label``."""
    sp = grid.spacing[::-1]
    idx = np.argwhere(label)
    c = idx.mean(0) * sp
    r = (3 * label.sum() * np.prod(sp) / (4 * np.pi)) ** (1 / 3)
    d = rng.normal(size=3)
    c = c + d / np.linalg.norm(d) * rng.uniform(0.3, 0.7) * r
    rr = r * rng.uniform(0.6, 1.6)
    pad = np.ceil((rr + 2) / sp).astype(int)
    lo = np.maximum(np.floor(c / sp).astype(int) - pad, 0)
    hi = np.minimum(np.ceil(c / sp).astype(int) + pad + 1, label.shape)
    out = np.zeros(label.shape, bool)
    kk, jj, ii = np.meshgrid(*(np.arange(lo[a], hi[a]) for a in range(3)), indexing="ij")
    dist = np.sqrt((kk * sp[0] - c[0]) ** 2 + (jj * sp[1] - c[1]) ** 2 + (ii * sp[2] - c[2]) ** 2)
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = dist <= rr
    if not out.any():
        out = label.copy()
    return out


def add_abutting(ct: Volume, label: np.ndarray, rng: np.random.Generator) -> Volume:
    """A blob of the lesion's own density touching it (outside it): an adjacent vessel / atelectasis / node."""
    sp = ct.spacing[::-1]
    idx = np.argwhere(label)
    if idx.size == 0:
        return ct
    img = ct.array.astype(np.float32)
    c = idx.mean(0) * sp
    r = (3 * label.sum() * np.prod(sp) / (4 * np.pi)) ** (1 / 3)
    d = rng.normal(size=3)
    d /= np.linalg.norm(d)
    rb = r * rng.uniform(0.7, 1.2)
    cb = c + d * (r + 0.6 * rb)
    hu = float(np.median(img[label]))
    pad = np.ceil((rb + 2) / sp).astype(int)
    lo = np.maximum(np.floor(cb / sp).astype(int) - pad, 0)
    hi = np.minimum(np.ceil(cb / sp).astype(int) + pad + 1, label.shape)
    if np.any(hi <= lo):
        return ct
    kk, jj, ii = np.meshgrid(*(np.arange(lo[a], hi[a]) for a in range(3)), indexing="ij")
    dist = np.sqrt((kk * sp[0] - cb[0]) ** 2 + (jj * sp[1] - cb[1]) ** 2 + (ii * sp[2] - cb[2]) ** 2)
    w = np.clip(rb + 0.5 - dist, 0, 1).astype(np.float32)
    w[label[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]] = 0
    sub = img[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    sub[:] = sub * (1 - w) + (hu + rng.normal(0, 8.0, sub.shape).astype(np.float32)) * w
    return ct.with_array(np.rint(img).astype(np.int16))


class ErrRegistration(IdentityRegistration):
    """The exact synthetic motion (follow-up → baseline), optionally composed with a local error."""

    def __init__(self, baseline: Volume, followup: Volume, to_base: Any, to_fu: Any, err: Bump | None) -> None:
        super().__init__(baseline, followup)
        self.engine = "oracle" + ("+error" if err is not None else "")
        self.to_base, self.to_fu, self.err = to_base, to_fu, err

    def map_points_to_baseline(self, points_mm: np.ndarray) -> np.ndarray:
        y = np.atleast_2d(np.asarray(points_mm, float))
        return np.asarray(self.to_base(self.err(y) if self.err is not None else y), float)

    def map_points_to_followup(self, points_mm: np.ndarray) -> np.ndarray:
        return np.asarray(self.to_fu(np.atleast_2d(np.asarray(points_mm, float))), float)  # error ignored

    def warp_labels(self, baseline_labels: Volume) -> Volume:
        extra = 15.0 + (float(np.linalg.norm(self.err.amplitude)) if self.err is not None else 0.0)
        return warp_labels_near(
            baseline_labels, self.followup_grid, self.map_points_to_baseline, self.map_points_to_followup, extra
        )


class Oracle:
    """Registration engine of the bench: exact motion of each pair, with the injected error where there is one."""

    name, version = "oracle", "1.0"

    def __init__(self, patients: list[Patient], errors: dict[tuple[str, int], Bump]) -> None:
        self.by_id = {id(ct): (p, t) for p in patients for t, ct in enumerate(p.cts)}
        self.errors = errors

    def register(self, baseline: Volume, followup: Volume) -> ErrRegistration:
        (p, a), (_, b) = self.by_id[id(baseline)], self.by_id[id(followup)]
        to_base, to_fu = exact_maps(p, a, b)
        return ErrRegistration(baseline, followup, to_base, to_fu, self.errors.get((p.name, b)) if a == 0 else None)


def inject(p: Patient, rng: np.random.Generator) -> dict[str, Any]:
    """Rough prompts, abutting structures (into ``p.cts``) and registration errors (returned) for one patient."""
    ids = sorted(int(v) for v in np.unique(p.labels[0].array) if v > 0)
    rough = {n: rough_prompt(p.labels[0].array == n, p.cts[0], rng) for n in ids if rng.random() < 0.33}
    abut: dict[int, int] = {}
    for n in ids:
        if rng.random() < 0.33:
            abut[n] = int(rng.integers(1, len(p.cts)))
    for n, t0 in abut.items():
        for t in range(t0, len(p.cts)):
            p.cts[t] = add_abutting(p.cts[t], p.labels[t].array == n, np.random.default_rng(rng.integers(1 << 30)))
    errors: dict[int, Bump] = {}
    for t in range(1, len(p.cts)):
        if rng.random() < 0.33:
            present = [n for n in ids if (p.labels[t].array == n).any()]
            if not present:
                continue
            n = present[int(rng.integers(len(present)))]
            c = centroid(p.labels[t].array == n, p.cts[t])
            if c is None:
                continue
            d = rng.normal(size=3)
            amp = d / np.linalg.norm(d) * rng.uniform(5.0, 14.0)
            errors[t] = Bump(c + rng.normal(0, 5.0, 3), amp, float(rng.uniform(15.0, 35.0)))
    return {"rough": rough, "abut": abut, "errors": errors}


# ---- evaluation -----------------------------------------------------------------------------------------------
def dates(n: int) -> list[str]:
    from datetime import date, timedelta

    d0 = date(2026, 1, 5)
    return [(d0 + timedelta(days=56 * t)).strftime("%Y%m%d") for t in range(n)]


def run_patient(p: Patient, inj: dict[str, Any], reg: Oracle, rules: ConfidenceRules) -> list[dict[str, Any]]:
    ds = dates(len(p.cts))
    tps = [Timepoint(f"{p.name}.{t}", ct, ds[t]) for t, ct in enumerate(p.cts)]
    prompts = [  # the baseline annotations, the rough ones swapped in
        replace(pr, mask=p.labels[0].with_array(inj["rough"][pr.identity.label].astype(np.uint8)))
        if pr.identity.label in inj["rough"]
        else pr
        for pr in truth_prompts(p)
    ]
    track_lesions(
        tps,
        prompts,
        source_index=0,
        registration=reg,
        segmentation=build_segmentation("adaptive"),
        options=TrackingOptions(confidence=rules),
    )
    rows = []
    annotated = {  # mm3 of each baseline annotation as given (rough ones included)
        pr.identity.label: float((pr.mask.array > 0).sum()) * pr.mask.voxel_volume_mm3()
        for pr in prompts
        if pr.mask is not None
    }
    for t in range(1, len(tps)):
        for les in tps[t].lesions:
            n = les.identity.label
            gt = p.labels[t].array == n
            pred = les.mask.array > 0
            conf = les.meta["confidence"]
            failures = [
                *(["rough prompt"] if n in inj["rough"] else []),
                *(["abutting structure"] if inj["abut"].get(n, 99) <= t else []),
                *(["misregistration"] if t in inj["errors"] else []),
            ]
            row: dict[str, Any] = {
                "patient": p.name,
                "t": t,
                "label": n,
                "kind": p.kinds.get(n, ""),
                "course": p.courses.get(n, ""),
                "injected": failures,
                "gt_present": bool(gt.any()),
                "pred_present": les.status is LesionStatus.PRESENT,
                "dice": float(2 * (gt & pred).sum() / (gt.sum() + pred.sum())) if gt.any() else None,
                # volume change against the baseline: the truth's, and the one the report states (vs the annotation)
                "true_volume_ratio": float(gt.sum() * p.labels[t].voxel_volume_mm3())
                / max(float((p.labels[0].array == n).sum()) * p.labels[0].voxel_volume_mm3(), 1e-6),
                "reported_volume_ratio": float(pred.sum()) * les.mask.voxel_volume_mm3() / annotated[n]
                if annotated.get(n)
                else None,
                "confidence": conf.confidence,
                "review": bool(les.meta.get("review")),
                # the flag as it was before issue 29's two signals, from the same evidence (the segmentation does not
                # depend on the confidence, so this is the previous code's flag on the very same results)
                "review_before": _flag_before(EVIDENCE.get(id(conf), {}), rules),
                "reasons": conf.reasons,
                "signals": {s.name: [s.value, round(s.score, 3)] for s in conf.signals},
                "evidence": EVIDENCE.get(id(conf), {}),
            }
            rows.append(row)
    return rows


#: evidence that only issue 29's signals (change_coherence, registration_change) read
NEW_EVIDENCE = ("diameter_ratio", "registration_ratio")


def _flag_before(evidence: dict[str, Any], rules: ConfidenceRules) -> bool | None:
    """The review flag without issue 29's two signals (None without evidence)."""
    if not evidence:
        return None
    return combine(cast(Evidence, {k: v for k, v in evidence.items() if k not in NEW_EVIDENCE}), rules).review


def roc(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Flagging = confidence below a threshold; positives Dice < 0.5, negatives Dice >= 0.8."""
    bad = np.array([r["confidence"] for r in rows if r["dice"] is not None and r["dice"] < 0.5])
    good = np.array([r["confidence"] for r in rows if r["dice"] is not None and r["dice"] >= 0.8])
    ths = np.unique(np.concatenate([[0.0, 1.0001], bad, good, np.linspace(0, 1, 21)]))
    pts = []
    for th in ths:
        tpr = float((bad < th).mean()) if bad.size else 0.0
        fpr = float((good < th).mean()) if good.size else 0.0
        pts.append((float(fpr), float(tpr), float(th)))
    pts.sort()
    fpr_a = np.array([0.0] + [q[0] for q in pts] + [1.0])
    tpr_a = np.array([0.0] + [q[1] for q in pts] + [1.0])
    auc = float(np.sum(np.diff(fpr_a) * (tpr_a[1:] + tpr_a[:-1]) / 2))
    return {
        "failed_dice_lt_0.5": int(bad.size),
        "good_dice_ge_0.8": int(good.size),
        "auc": auc,
        "points": [{"threshold": round(th, 4), "fpr": round(f, 4), "tpr": round(t, 4)} for f, t, th in pts],
    }


def at_threshold(rows: list[dict[str, Any]], th: float) -> dict[str, Any]:
    scored = [r for r in rows if r["dice"] is not None]
    bad = [r for r in scored if r["dice"] < 0.5]
    mid = [r for r in scored if 0.5 <= r["dice"] < 0.8]
    good = [r for r in scored if r["dice"] >= 0.8]
    gone = [r for r in rows if r["dice"] is None]

    def frac(rs: list[dict[str, Any]], key: str = "review") -> float | None:
        return sum(bool(r.get(key)) for r in rs) / len(rs) if rs else None

    def counts(rs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "n": len(rs),
            "flagged_before": sum(bool(r.get("review_before")) for r in rs),
            "flagged_now": sum(bool(r["review"]) for r in rs),
        }

    # the report states the wrong direction of change: the truth changed by at least 20 % one way, the reported
    # volume change (against the annotation) goes the other way (issue 29: "-11.5 % while it truly grew 41 %")
    wrong = [
        r
        for r in scored
        if r.get("reported_volume_ratio")
        and r["pred_present"]
        and abs(np.log(r["true_volume_ratio"])) >= np.log(1.2)
        and np.log(r["true_volume_ratio"]) * np.log(r["reported_volume_ratio"]) < 0
    ]
    return {
        "threshold": th,
        "wrong_direction_of_change": len(wrong),
        "flagged_of_wrong_direction": frac(wrong),
        "flagged_of_failed (Dice < 0.5)": frac(bad),
        "flagged_of_good (Dice >= 0.8)": frac(good),
        "flagged_of_middle (0.5 <= Dice < 0.8)": frac(mid),
        "flagged_of_truly_vanished": frac(gone),
        "flagged_overall": frac(rows),
        # before (without issue 29's signals) -> now, on the same results
        "before_vs_now": {
            "failed (Dice < 0.5)": counts(bad),
            "good (Dice >= 0.8)": counts(good),
            "middle (0.5 <= Dice < 0.8)": counts(mid),
            "truly vanished": counts(gone),
            "wrong direction of change": counts(wrong),
            "all": counts(rows),
        },
        "acceptance": {
            ">= 80 % of Dice < 0.5 flagged": (frac(bad) or 0.0) >= 0.8,
            "<= 20 % of Dice >= 0.8 flagged": (frac(good) or 0.0) <= 0.2,
        },
    }


def plot_roc(res: dict[str, Any], th: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    f = [0.0] + [q["fpr"] for q in res["points"]] + [1.0]
    t = [0.0] + [q["tpr"] for q in res["points"]] + [1.0]
    ax.plot(f, t, ".-", label=f"confidence (AUC {res['auc']:.2f})")  # ties joined linearly (as the AUC)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.7, ls=":")
    ax.plot(
        [th["flagged_of_good (Dice >= 0.8)"]],
        [th["flagged_of_failed (Dice < 0.5)"]],
        "o",
        color="C3",
        label=f"review_threshold {th['threshold']:.2f}",
    )
    ax.axvline(0.2, color="grey", lw=0.6, ls="--")
    ax.axhline(0.8, color="grey", lw=0.6, ls="--")
    ax.set(xlabel="flagged among Dice >= 0.8", ylabel="flagged among Dice < 0.5", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def plot_runs(paths: list[Path], out: Path) -> None:
    """Overlay the ROC curves of saved outputs of this bench (one curve per JSON file, labelled by its name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    for k, path in enumerate(paths):
        res = json.loads(path.read_text())
        pts = res["roc"]["points"]
        f = [0.0] + [q["fpr"] for q in pts] + [1.0]
        t = [0.0] + [q["tpr"] for q in pts] + [1.0]
        th = res["at_threshold"]
        label = f"{path.stem} ({res['roc']['failed_dice_lt_0.5']} failed, AUC {res['roc']['auc']:.2f})"
        ax.plot(f, t, ".-", ms=3, lw=1, color=f"C{k}", label=label)
        ax.plot([th["flagged_of_good (Dice >= 0.8)"]], [th["flagged_of_failed (Dice < 0.5)"]], "o", color=f"C{k}")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.7, ls=":")
    ax.axvline(0.2, color="grey", lw=0.6, ls="--")
    ax.axhline(0.8, color="grey", lw=0.6, ls="--")
    ax.set(xlabel="flagged among Dice >= 0.8", ylabel="flagged among Dice < 0.5", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title("confidence ROC (dots: review_threshold)", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def _patients(args: argparse.Namespace, seeds: list[int], lung_seed: int) -> list[Patient]:
    """The phantom patients of ``seeds`` and, unless ``--no-lung1``, the LUNG1 patient."""
    patients = [phantom_patient(s, args.followups) for s in seeds]
    if not args.no_lung1:
        lp = lung1_patient(args.lung1_seed if args.lung1_seed is not None else lung_seed, args.followups)
        if lp is not None:
            patients.append(lp)
    return patients


def _flags_by_signal(rows: list[dict[str, Any]], threshold: float) -> dict[str, int]:
    """How often each signal fell below the review threshold in a lesion flagged for review."""
    by_signal: dict[str, int] = {}
    for r in rows:
        if r["review"]:
            for name, (_v, s) in r["signals"].items():
                if s < threshold:
                    by_signal[name] = by_signal.get(name, 0) + 1
    return by_signal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", choices=sorted(SETS), default="heldout")
    ap.add_argument("--seeds", type=str, default=None, help="phantom seeds instead of the set's, e.g. 44,45,46")
    ap.add_argument("--followups", type=int, default=5)
    ap.add_argument("--no-lung1", action="store_true")
    ap.add_argument("--lung1-seed", type=int, default=None, help="lung1 seed instead of the set's")
    ap.add_argument("--threshold", type=float, default=None, help="review threshold (default: ConfidenceRules)")
    ap.add_argument("--rows", action="store_true", help="include per-lesion rows")
    ap.add_argument("--plot", type=Path, default=None, help="write the ROC plot (PNG)")
    ap.add_argument("--plot-runs", nargs="+", type=Path, default=None, help="overlay saved outputs' ROCs into --plot")
    args = ap.parse_args()
    if args.plot_runs:
        if args.plot is None:
            ap.error("--plot-runs needs --plot")
        plot_runs(args.plot_runs, args.plot)
        return

    rules = ConfidenceRules() if args.threshold is None else ConfidenceRules(review_threshold=args.threshold)
    seeds, lung_seed = SETS[args.set]
    if args.seeds:
        seeds = [int(v) for v in args.seeds.split(",")]
    t0 = time.perf_counter()
    patients = _patients(args, seeds, lung_seed)
    injections = {}
    errors: dict[tuple[str, int], Bump] = {}
    for k, p in enumerate(patients):
        inj = inject(p, np.random.default_rng(1000 + 17 * k + (seeds[0] if seeds else 0)))
        injections[p.name] = inj
        errors.update({(p.name, t): e for t, e in inj["errors"].items()})
    synth_s = time.perf_counter() - t0
    reg = Oracle(patients, errors)
    import lesiontrack.pipeline.science.tracking as tracking_mod

    assess_seconds: list[float] = []

    def timed_assess(**kw: Any) -> Any:  # the confidence's own cost, apart from segmentation; keeps the evidence
        t = time.perf_counter()
        evidence = measure_lesion(**kw)
        out = combine(evidence, kw.get("rules"))
        assess_seconds.append(time.perf_counter() - t)
        EVIDENCE[id(out)] = {**evidence}
        return out

    tracking_mod.assess_lesion = timed_assess  # type: ignore[attr-defined]
    rows: list[dict[str, Any]] = []
    t1 = time.perf_counter()
    for p in patients:
        rows.extend(run_patient(p, injections[p.name], reg, rules))
        print(f"{time.strftime('%H:%M:%S')} {p.name} done", file=sys.stderr, flush=True)
    track_s = time.perf_counter() - t1
    curve = roc(rows)
    th = at_threshold(rows, rules.review_threshold)
    by_signal = _flags_by_signal(rows, rules.review_threshold)
    by_failure: dict[str, dict[str, Any]] = {}
    for name in ("none", "rough prompt", "abutting structure", "misregistration"):
        rs = [
            r
            for r in rows
            if r["dice"] is not None and ((name in r["injected"]) or (name == "none" and not r["injected"]))
        ]
        by_failure[name] = {
            "n": len(rs),
            "mean_dice": float(np.mean([r["dice"] for r in rs])) if rs else None,
            "failed": sum(r["dice"] < 0.5 for r in rs),
            "flagged": sum(r["review"] for r in rs),
        }
    doc: dict[str, Any] = {
        "benchmark": "per-lesion confidence / review flag",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared)",
        "set": args.set if not args.seeds else f"{args.set} (phantom seeds {args.seeds})",
        "patients": [p.name for p in patients],
        "followups_per_patient": args.followups,
        "lesion_followups": len(rows),
        "with_truth_present": sum(r["dice"] is not None for r in rows),
        "injected": {
            p.name: {
                "rough_prompts": sorted(injections[p.name]["rough"]),
                "abutting_from": {str(k): v for k, v in injections[p.name]["abut"].items()},
                "misregistered_followups": sorted(injections[p.name]["errors"]),
            }
            for p in patients
        },
        "rules": rules.__dict__,
        "roc": curve,
        "at_threshold": th,
        "flags_by_signal": by_signal,
        "by_injected_failure": by_failure,
        "seconds": {
            "synthesis": synth_s,
            "tracking_with_confidence": track_s,
            "confidence_per_lesion_median": float(np.median(assess_seconds)) if assess_seconds else None,
            "confidence_per_lesion_max": float(np.max(assess_seconds)) if assess_seconds else None,
        },
    }
    if args.rows:
        doc["rows"] = rows
    if args.plot is not None:
        plot_roc(curve, th, args.plot, f"{args.set}: {len(patients)} patients, {doc['with_truth_present']} results")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
