"""Prior Dice only (issue 31, item 2): the 3-D lesion each drawing becomes on the baseline, against the truth, without
tracking — the development check for changes to the derivation from a drawing (bench/annotations.py's ``prior Dice``
column, in seconds rather than minutes).

The drawings and the patients are bench/annotations.py's (bench/drawn_lesions.py on the true baseline mask, the same
random generator per patient, phantoms on 5 mm slices, the real lung1 CT), derived as the tracking loop derives them
(``pipeline.science.drawn_priors.drawn_lesion`` and the nearest component). ``--demo`` adds the demo patient's faint
liver lesion (``make_phantom(seed=8)`` on the demo's 40 x 80 x 80 grid at 3 mm, docs/annotations.md *Through the
viewer*), drawn as bench/drawn_lesions.py draws and as the OHIF test draws (a left-right line across the lesion's
bounding box on its largest slice). Prints one JSON document: per source the mean and every lesion's Dice.

Usage: ``python bench/drawn_prior_dice.py --phantoms 1,2,3 [--lung1 5,11] [--demo] [--demo-seeds 1,2]
[--sources line,ellipse] [--choice]`` (``--demo-seeds``: each seed's liver lesion on the demo's grid, the same way;
``--choice``: also, per lesion and source, both candidates ``drawn_lesion`` chooses between — the lesion grown from
the drawing and the engine's segmentation of its box — with their Dice and which was kept, and per source the mean
of each candidate alone and of the better one per lesion: the room a better choice has)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.drawn_lesions import drawings
from bench.tracking import Patient, lung1_patient, phantom_patient
from lesiontrack.models.engines import build_segmentation
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.base import SegmentationEngine, SegReference
from lesiontrack.models.segmentation.components import keep_nearest_component
from lesiontrack.models.segmentation.drawing import Drawing, DrawingKind
from lesiontrack.models.segmentation.from_drawing import lesion_from_drawing
from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt
from lesiontrack.pipeline.dicom.annotations.common import drawing_prompt
from lesiontrack.pipeline.science.drawn_priors import drawn_lesion
from lesiontrack.synthetic.phantom import make_phantom

SOURCES = ("line", "bidirectional", "ellipse", "arrow")


class _Remembered:
    """The engine, its box segmentation of each prompt remembered (``drawn_lesion`` and ``--choice`` both ask)."""

    def __init__(self, engine: SegmentationEngine) -> None:
        self.engine, self.name, self.version = engine, engine.name, getattr(engine, "version", "")
        self._seen: dict[int, tuple[Prompt, Volume]] = {}

    def segment(self, image: Volume, prompt: Prompt, reference: SegReference | None = None) -> Volume:
        hit = self._seen.get(id(prompt))
        if hit is None or hit[0] is not prompt or reference is not None:
            hit = (prompt, self.engine.segment(image, prompt, reference))
            self._seen = {id(prompt): hit}
        return hit[1]


def patients_of(phantoms: str, lung1: str) -> list[Patient]:
    """The baselines of the comma-separated phantom seeds (5 mm slices) and lung1 seeds (where lung1 is present)."""
    patients = [phantom_patient(int(s), 0, 5.0) for s in phantoms.split(",") if s]
    return patients + [p for s in lung1.split(",") if s and (p := lung1_patient(int(s), 0)) is not None]


def lesion_drawings(patients: list[Patient]) -> Iterator[tuple[Patient, int, np.ndarray, dict[str, Drawing]]]:
    """Per patient and lesion: the lesion's label, its true mask and bench/annotations.py's drawings of it (the same
    random generator per patient, lesions in label order)."""
    for p in patients:
        rng = np.random.default_rng(sum(map(ord, p.name)))
        lab = p.labels[0].array
        for n in sorted(int(v) for v in np.unique(lab) if v > 0):
            truth = lab == n
            yield p, n, truth, drawings(p.labels[0].with_array(truth.astype(np.uint8)), rng)


def drawn_prompt(drawing: Drawing, label: int) -> Prompt:
    """The prompt the readers make of ``drawing`` for lesion ``label``."""
    return drawing_prompt(LesionIdentity(f"2.25.{label}", f"L{label}", label), drawing, drawing.what or "")


def kept(mask: Volume, centre: np.ndarray) -> np.ndarray:
    """``mask``'s component nearest ``centre`` (boolean), as the tracking loop keeps it
    (``TrackingOptions.max_centre_distance_mm``)."""
    return np.asarray(keep_nearest_component(mask, centre, 15.0).array > 0)


def _dice(mask: Volume | None, centre: np.ndarray, truth: np.ndarray) -> float:
    if mask is None:
        return 0.0
    got = kept(mask, centre)
    return float(2 * (got & truth).sum() / max(got.sum() + truth.sum(), 1))


def prior_dice(ct: Volume, truth: np.ndarray, drawing: Drawing, label: int, engine: SegmentationEngine) -> float:
    """Dice of the lesion derived from ``drawing`` on ``ct`` against ``truth``, as the tracking loop derives it."""
    return choice_dice(ct, truth, drawing, label, engine)[0]


def choice_dice(
    ct: Volume, truth: np.ndarray, drawing: Drawing, label: int, engine: SegmentationEngine, both: bool = False
) -> tuple[float, dict[str, Any]]:
    """:func:`prior_dice`, and with ``both`` the Dice of each candidate ``drawn_lesion`` chooses between (``grown``,
    ``box``) and which it kept."""
    prompt = drawn_prompt(drawing, label)
    remembered = _Remembered(engine)
    drawn = drawn_lesion(ct, prompt, remembered)
    assert drawn is not None
    dice = _dice(drawn.mask, prompt.centre_mm(), truth)
    if not both or drawing.diameters_mm()[0] <= 0:
        return dice, {}
    grown = lesion_from_drawing(ct, drawing, engine)[0]
    boxed = remembered.segment(ct, prompt, None)
    kept = "grown" if grown is not None and np.array_equal(drawn.mask.array > 0, grown.array > 0) else "box"
    candidates = {"grown": _dice(grown, prompt.centre_mm(), truth), "box": _dice(boxed, prompt.centre_mm(), truth)}
    return dice, {"kept": kept, **{k: round(v, 3) for k, v in candidates.items()}}


def ohif_line(ct: Volume, truth: np.ndarray) -> Drawing:
    """The OHIF test's line: left to right across the lesion's bounding box, on its largest slice, at the box's middle
    row (tests/test_ohif_drawn_prior.py)."""
    k = int(np.argmax(truth.sum(axis=(1, 2))))
    (j0, i0), (j1, i1) = np.argwhere(truth[k]).min(0), np.argwhere(truth[k]).max(0)
    row = (j0 + j1) / 2
    a, b = ct.index_to_patient(np.array([i0 - 0.5, row, k])), ct.index_to_patient(np.array([i1 + 0.5, row, k]))
    return Drawing(DrawingKind.LINE, [np.array([a, b])], "OHIF line")


def demo_case(
    engine: SegmentationEngine, sources: list[str], seed: int = 8, faint_hu: float | None = None
) -> dict[str, Any]:
    """The demo patient's liver lesion (seed 8: the faint one of docs/annotations.md, *Through the viewer*) on the
    demo's grid (40 x 80 x 80 at 3 mm, the demo generator's noise); ``faint_hu``: its contrast with the liver brought
    to that many HU (the lesion's difference from its liver scaled, noise and texture kept)."""
    ph = make_phantom(seed=seed, shape=(40, 80, 80), spacing=(3.0, 3.0, 3.0), n_lesions=3)
    livers = [i for i in ph.lesion_info if i.organ == "liver"]
    if not livers:
        return {"seed": seed, "liver lesion": None}
    info = livers[0]
    truth = ph.lesions.array == info.label
    ct = ph.ct
    contrast = float(info.params.get("contrast_hu", 0.0))
    if faint_hu is not None and contrast:
        # the lesion's mean offset from its liver shrunk to faint_hu (a soft edge, as the generator's partial volume)
        soft = ndi.gaussian_filter(truth.astype(np.float32), 0.5)
        shifted = ct.array.astype(np.float32) + soft * (faint_hu - contrast)
        ct = ct.with_array(np.rint(shifted).astype(np.int16))
        contrast = faint_hu
    ds = drawings(ph.lesions.with_array(truth.astype(np.uint8)), np.random.default_rng(seed))
    out = {"OHIF line": prior_dice(ct, truth, ohif_line(ct, truth), info.label, engine)}
    out.update({s: prior_dice(ct, truth, ds[s], info.label, engine) for s in sources})
    return {"seed": seed, "contrast_hu": round(contrast), **{k: round(v, 3) for k, v in out.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phantoms", default="1,2,3", help="phantom seeds (5 mm slices)")
    ap.add_argument("--lung1", default="", help="lung1 seeds")
    ap.add_argument("--demo", action="store_true", help="also the demo patient's faint liver lesion")
    ap.add_argument("--demo-seeds", default="", help="also the liver lesion of these seeds on the demo's grid")
    ap.add_argument("--faint", type=float, default=None, help="--demo-seeds' lesions with this contrast (HU)")
    ap.add_argument("--sources", default=",".join(SOURCES[:3]))
    ap.add_argument("--choice", action="store_true", help="also both candidates per lesion and the oracle's mean")
    args = ap.parse_args()
    t0 = time.perf_counter()
    sources = [s for s in args.sources.split(",") if s]
    engine = build_segmentation("adaptive")
    per: dict[str, list[float]] = {s: [] for s in sources}
    cand: dict[str, dict[str, list[float]]] = {s: {"grown": [], "box": [], "better": []} for s in sources}
    lesions: list[dict[str, Any]] = []
    for p, n, truth, ds in lesion_drawings(patients_of(args.phantoms, args.lung1)):
        row: dict[str, Any] = {"patient": p.name, "lesion": n, "kind": p.kinds.get(n, "")}
        for s in sources:
            dice, choice = choice_dice(p.cts[0], truth, ds[s], n, engine, args.choice)
            row[s] = round(dice, 3)
            per[s].append(row[s])
            if choice:
                row[f"{s} candidates"] = choice
                for k in ("grown", "box"):
                    cand[s][k].append(choice[k])
                cand[s]["better"].append(max(choice["grown"], choice["box"]))
        lesions.append(row)
        print(f"{time.strftime('%H:%M:%S')} {p.name} L{n} done", file=sys.stderr, flush=True)
    doc: dict[str, Any] = {
        "benchmark": "prior Dice of lesions derived from drawings (development)",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python " + " ".join(sys.argv),
        "mean": {s: round(float(np.mean(v)), 4) for s, v in per.items() if v},
        "min": {s: round(float(np.min(v)), 3) for s, v in per.items() if v},
        **(
            {
                "candidates_mean": {
                    s: {k: round(float(np.mean(v)), 4) for k, v in c.items() if v} for s, c in cand.items()
                }
            }
            if args.choice
            else {}
        ),
        "lesions": lesions,
    }
    if args.demo:
        doc["demo_faint_liver_lesion"] = demo_case(engine, sources)
    if args.demo_seeds:
        rows = [demo_case(engine, sources, int(s), args.faint) for s in args.demo_seeds.split(",") if s]
        doc["demo_grid_liver_lesions"] = rows
        found = [r for r in rows if r.get("liver lesion", 0) is not None]
        doc["demo_grid_mean"] = {s: round(float(np.mean([r[s] for r in found])), 4) for s in ["OHIF line", *sources]}
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
