"""A picture of drawn priors (issue 31): for a few lesions, the slice a radiologist drew on with each drawing (a line,
a bidirectional pair, an ellipse, an arrow), the true lesion's outline and the outline of the 3-D lesion LesionTrack
derived from the drawing, with its Dice and how many slices each spans.

The drawings and the derivation are bench/drawn_prior_dice.py's (bench/drawn_lesions.py on the true baseline mask,
``pipeline.science.drawn_priors.drawn_lesion`` and the nearest component, as the tracking loop derives them).

Usage: ``python bench/drawn_prior_figure.py --phantoms 97,98 [--lung1 47] [--kinds "part-solid,juxtapleural"]
[--lesions phantom97:4,lung1s47:4] --out docs/img/drawn_priors.png`` (one row per lesion whose kind contains one of
``--kinds`` or that ``--lesions`` names, in that order; every lesion without either).
Prints one JSON document: the lesions drawn, per source their Dice and slice counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.drawn_prior_dice import drawn_prompt, kept, lesion_drawings, patients_of
from lesiontrack.models.engines import build_segmentation
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.drawing import Drawing, DrawingKind
from lesiontrack.pipeline.science.drawn_priors import drawn_lesion

SOURCES = ("line", "bidirectional", "ellipse", "arrow")
HALF_MM = 22.0  # half the width of each panel's crop


def derived(ct: Volume, drawing: Drawing, label: int, engine: Any) -> np.ndarray:
    """The 3-D lesion derived from ``drawing`` (boolean, on ``ct``'s grid), as the tracking loop keeps it."""
    prompt = drawn_prompt(drawing, label)
    got = drawn_lesion(ct, prompt, engine)
    return kept(got.mask, prompt.centre_mm()) if got is not None else np.zeros(ct.shape, bool)


def _window(level_hu: float) -> tuple[float, float]:
    """Lung window for a lesion in aerated lung, soft-tissue window otherwise."""
    return (-1200.0, 300.0) if level_hu < -400 else (-160.0, 240.0)


def _draw_drawing(ax: Any, ct: Volume, d: Drawing, lo: np.ndarray) -> None:
    """The drawing in the panel's pixel coordinates (columns i, rows j, offset ``lo``)."""
    for part in d.parts:
        ijk = ct.patient_to_index(part)
        x, y = ijk[:, 0] - lo[1], ijk[:, 1] - lo[0]
        if d.kind is DrawingKind.ELLIPSE:
            c = np.array([(x[0] + x[1]) / 2, (y[0] + y[1]) / 2])
            a = np.array([x[1] - x[0], y[1] - y[0]]) / 2
            b = np.array([x[3] - x[2], y[3] - y[2]]) / 2
            t = np.linspace(0, 2 * np.pi, 100)
            pts = c[:, None] + a[:, None] * np.cos(t) + b[:, None] * np.sin(t)
            ax.plot(pts[0], pts[1], color="yellow", lw=1.2)
        elif d.kind is DrawingKind.ARROW:
            ax.annotate(
                "", xy=(x[0], y[0]), xytext=(x[1], y[1]), arrowprops={"arrowstyle": "->", "color": "yellow", "lw": 1.4}
            )
        else:
            ax.plot(x, y, color="yellow", lw=1.4)


def panel(ax: Any, ct: Volume, truth: np.ndarray, got: np.ndarray, d: Drawing, title: str) -> dict[str, Any]:
    """One panel: the drawn slice around the lesion, truth (green) and derived (orange) outlines, the drawing."""
    k = int(np.rint(ct.patient_to_index(d.all_points)[:, 2].mean()))
    centre = np.argwhere(truth[k] if truth[k].any() else truth.any(axis=0)).mean(0)
    half = np.rint(HALF_MM / ct.spacing[[1, 0]]).astype(int)
    lo = np.maximum(np.rint(centre).astype(int) - half, 0)
    hi = np.minimum(lo + 2 * half, np.array(ct.shape[1:]))
    img = ct.array[k, lo[0] : hi[0], lo[1] : hi[1]].astype(float)
    level = float(np.median(ct.array[truth]))
    vmin, vmax = _window(level)
    aspect = float(ct.spacing[1] / ct.spacing[0])
    ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
    for m, colour in ((truth, "lime"), (got, "orange")):
        sub = m[k, lo[0] : hi[0], lo[1] : hi[1]]
        if sub.any():
            ax.contour(sub.astype(float), levels=[0.5], colors=colour, linewidths=1.2)
    _draw_drawing(ax, ct, d, lo)
    dice = float(2 * (got & truth).sum() / max(got.sum() + truth.sum(), 1))
    slices_t, slices_g = int(truth.any(axis=(1, 2)).sum()), int(got.any(axis=(1, 2)).sum())
    ax.set_title(f"{title}\nDice {dice:.2f} · slices {slices_g} (true {slices_t})", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return {"dice": round(dice, 3), "slices": slices_g, "true_slices": slices_t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phantoms", default="97,98", help="phantom seeds (5 mm slices)")
    ap.add_argument("--lung1", default="", help="lung1 seeds")
    ap.add_argument("--kinds", default="", help="comma-separated parts of lesion kinds to show (default: all)")
    ap.add_argument("--lesions", default="", help="comma-separated PATIENT:LABEL to show, in this order")
    ap.add_argument("--out", type=Path, default=Path("docs/img/drawn_priors.png"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    engine = build_segmentation("adaptive")
    kinds = [k for k in args.kinds.split(",") if k]
    named = [(a, int(b)) for a, _, b in (x.partition(":") for x in args.lesions.split(",") if x)]
    rows = []
    for p, n, truth, ds in lesion_drawings(patients_of(args.phantoms, args.lung1)):
        if not (kinds or named) or any(k in p.kinds.get(n, "") for k in kinds) or (p.name, n) in named:
            rows.append((p, n, truth, ds))
    rows.sort(key=lambda r: named.index((r[0].name, r[1])) if (r[0].name, r[1]) in named else len(named))
    fig, axes = plt.subplots(len(rows), len(SOURCES), figsize=(2.3 * len(SOURCES), 2.5 * len(rows)), squeeze=False)
    shown: list[dict[str, Any]] = []
    for r, (p, n, truth, ds) in enumerate(rows):
        row: dict[str, Any] = {"patient": p.name, "lesion": n, "kind": p.kinds.get(n, "")}
        for c, source in enumerate(SOURCES):
            got = derived(p.cts[0], ds[source], n, engine)
            row[source] = panel(axes[r, c], p.cts[0], truth, got, ds[source], source)
        axes[r, 0].set_ylabel(f"{p.name} L{n}\n{p.kinds.get(n, '')}", fontsize=8)
        shown.append(row)
    fig.suptitle("drawing (yellow) · true lesion (green) · lesion derived from the drawing (orange)", fontsize=9)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.97))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    doc = {
        "benchmark": "drawn priors, by eye (issue 31)",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python " + " ".join(sys.argv),
        "figure": str(args.out),
        "lesions": shown,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
