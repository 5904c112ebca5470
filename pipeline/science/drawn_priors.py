"""Priors a radiologist drew on one image (a line, an arrow, an ellipse, a contour): the 3-D lesion on the annotated
CT, where each prompt came from, and the lower confidence of what follows from it until a person confirms it.

* :func:`drawn_lesion` — the lesion a prompt's drawing (``Prompt.meta["drawing"]``, set by the SR, GSPS and
  RTSTRUCT readers) marks, by :func:`models.segmentation.from_drawing.lesion_from_drawing`; when the image gives no
  lesion there, the engine segments the drawing's box as before, and the notes say so;
* :func:`prompt_origin_meta` — ``prompt_origin`` (``seg``, ``contours``, ``line``, ``arrow``, …) and ``weak_prior``
  for the tracked lesion's meta (the SR and the dashboard show them);
* :func:`drawn_diameters` — the radiologist's own diameters beside ours of the lesion derived from them (the SR
  reports both and the difference);
* :func:`weaken_for_origin` — a follow-up result propagated from a weak prior gets the ``prompt_origin`` signal
  (:data:`models.segmentation.drawing.WEAK_PRIOR_SCORE`), so an arrow's lesion is flagged for review.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.arrow import arrow_lesion
from lesiontrack.models.segmentation.base import SegmentationEngine
from lesiontrack.models.segmentation.drawing import WEAK_PRIOR_SCORE, Drawing, DrawingKind
from lesiontrack.models.segmentation.from_drawing import (
    confined_to_drawn_slice,
    lesion_from_drawing,
    measurement_error,
)
from lesiontrack.models.segmentation.prompts import Prompt, PromptKind
from lesiontrack.pipeline.science.confidence import ConfidenceRules, LesionConfidence, Signal, with_signal
from lesiontrack.pipeline.science.lesions import TrackedLesion


@dataclass(frozen=True)
class DrawnDiameters:
    """The radiologist's diameters drawn on the prior (mm; None: not drawn) and ours of the 3-D lesion derived from
    the drawing, on the same prior CT (:func:`drawn_diameters`); the SR states them side by side."""

    radiologist_long_mm: float | None
    radiologist_short_mm: float | None
    ours_long_mm: float
    ours_short_mm: float


@dataclass
class DrawnLesion:
    mask: Volume
    origin: str  # "line", "arrow", ...
    engine_name: str
    engine_version: str
    notes: list[str] = field(default_factory=list)


def drawing_of(prompt: Prompt) -> Drawing | None:
    d = prompt.meta.get("drawing")
    return d if isinstance(d, Drawing) else None


def drawn_lesion(ct: Volume, prompt: Prompt, engine: SegmentationEngine) -> DrawnLesion | None:
    """The 3-D lesion the prompt's drawing marks on ``ct``; None for a prompt without a drawing.

    For a drawing with diameters (a line, a bidirectional pair, an ellipse, a contour) two candidates are made — the
    lesion grown from the drawing (:func:`models.segmentation.from_drawing.lesion_from_drawing`) and the engine's
    segmentation of the drawing's box — and the one whose cross-section on the drawn slice reproduces the
    radiologist's own diameters best is kept (:func:`~models.segmentation.from_drawing.measurement_error`), unless it
    lies on the drawn slice only where the other reaches the next slice (:func:`_keep_grown`); the notes say which
    and why. An arrow or a point has no measurement to check: the grown lesion is kept — for an arrow, the one grown
    from its tip or from the diameter the image shows there, whichever outline the image supports clearly better
    (:func:`models.segmentation.arrow.arrow_lesion`)."""

    drawing = drawing_of(prompt)
    if drawing is None:
        return None
    engine_name = str(getattr(engine, "name", "engine"))
    version = str(getattr(engine, "version", ""))
    mask, notes = lesion_from_drawing(ct, drawing, engine)
    if drawing.kind is DrawingKind.ARROW:  # or the lesion at the diameter the image shows at its tip, if better
        tip_grown = mask
        mask, why = arrow_lesion(ct, drawing, tip_grown, engine)
        notes = [*notes, *why] if mask is tip_grown else why
    name = f"drawing+{engine_name}" if mask is not None and any("refined by" in n for n in notes) else "drawing"
    if drawing.diameters_mm()[0] <= 0:
        if mask is None:
            notes.append(f"segmented around the {drawing.kind.value} with {engine_name} instead")
            return DrawnLesion(engine.segment(ct, prompt, None), drawing.kind.value, engine_name, version, notes)
        return DrawnLesion(mask, drawing.kind.value, name, version, notes)
    boxed = engine.segment(ct, prompt, None)
    keep_grown = _keep_grown(mask, boxed, drawing, engine_name, notes)
    if keep_grown and mask is not None:
        return DrawnLesion(mask, drawing.kind.value, name, version, notes)
    return DrawnLesion(boxed, drawing.kind.value, engine_name, version, notes)


def _keep_grown(grown: Volume | None, boxed: Volume, drawing: Drawing, engine_name: str, notes: list[str]) -> bool:
    """Of the lesion grown from a drawing with diameters and the engine's segmentation of its box, whether the grown
    one is kept (a note says why): a candidate flattened onto the drawn slice
    (:func:`~models.segmentation.from_drawing.confined_to_drawn_slice`) loses to one that reaches the next slice;
    otherwise the one whose cross-section on the drawn slice reproduces the drawn diameters best is kept, the grown
    one on a tie (:func:`~models.segmentation.from_drawing.measurement_error`)."""
    kind = drawing.kind.value
    box_err = measurement_error(boxed, drawing)
    grown_err = measurement_error(grown, drawing) if grown is not None else float("inf")
    if grown is not None and grown_err < float("inf") and box_err < float("inf"):
        grown_flat, box_flat = confined_to_drawn_slice(grown, drawing), confined_to_drawn_slice(boxed, drawing)
        if grown_flat != box_flat:
            flat = f"{engine_name} on the {kind}'s box" if box_flat else f"the lesion grown from the {kind}"
            notes.append(
                f"{flat} lies on the drawn slice only, though a lesion {drawing.diameters_mm()[0]:.0f} mm long "
                f"reaches the next slice ({float(boxed.spacing[2]):.1f} mm apart): the other is kept"
            )
            return box_flat
    if grown is not None and grown_err <= box_err:  # neither reproducing the drawn slice: the box, as before drawings
        notes.append(f"reproduces the drawn diameters within {100 * grown_err:.0f} % (box: {100 * box_err:.0f} %)")
        return True
    notes.append(
        f"{engine_name} on the {kind}'s box kept: it reproduces the drawn diameters within "
        f"{100 * box_err:.0f} % (grown from the drawing: "
        + ("none" if grown is None else f"{100 * grown_err:.0f} %")
        + ")"
    )
    return False


def prompt_origin(prompt: Prompt) -> str:
    """Where it came from: the drawing's kind, ``contours`` (an RTSTRUCT stack), ``seg``, ``points`` or ``box``."""
    d = drawing_of(prompt)
    if d is not None:
        return d.kind.value
    explicit = prompt.meta.get("prompt_origin")
    if isinstance(explicit, str) and explicit:
        return explicit
    return {PromptKind.MASK: "seg", PromptKind.POINTS: "points", PromptKind.BOX: "box"}[prompt.kind]


def prompt_origin_meta(prompt: Prompt) -> dict[str, Any]:
    origin = prompt_origin(prompt)
    d = drawing_of(prompt)
    out: dict[str, Any] = {"prompt_origin": origin, "weak_prior": origin in {k.value for k in WEAK_PRIOR_SCORE}}
    if prompt.meta.get("prompt_object"):  # the object it was read from: SEG, SR, GSPS, RTSTRUCT, points
        out["prompt_object"] = prompt.meta["prompt_object"]
    if d is not None:
        long_, short = d.diameters_mm()
        if long_ > 0:  # the radiologist's own diameters, reported beside ours
            out["drawn_diameters_mm"] = [round(long_, 1), None if short is None else round(short, 1)]
        if d.what:
            out["drawn"] = d.what
    return out


def weaken_for_origin(
    conf: LesionConfidence, source_lesions: Sequence[TrackedLesion], label: int, rules: ConfidenceRules | None
) -> LesionConfidence:
    """``conf`` with the ``prompt_origin`` signal when the lesion's prior (``label`` among the annotated timepoint's
    lesions) was derived from a drawing on one image."""
    src = next((les for les in source_lesions if les.identity.label == label), None)
    origin = str(src.meta.get("prompt_origin", "")) if src is not None else ""
    if src is None or not src.meta.get("weak_prior") or origin not in {k.value for k in WEAK_PRIOR_SCORE}:
        return conf
    score = WEAK_PRIOR_SCORE[DrawingKind(origin)]
    reason = f"prior lesion derived from a {origin} on one image, not yet confirmed by a person"
    return with_signal(conf, Signal(name="prompt_origin", value=None, score=score, reason=reason), rules)


def drawn_diameters(prior_lesion: Any, prior_measurement: Any) -> DrawnDiameters | None:
    """The radiologist's diameters drawn on the prior (``meta["drawn_diameters_mm"]``, :func:`prompt_origin_meta`)
    beside ours of the derived lesion on the same CT (``prior_measurement``: its
    :class:`~pipeline.science.measurements.LesionMeasurement`); None when nothing was measured. A single line on a lymph
    node
    is its short axis (RECIST 1.1)."""
    drawn = prior_lesion.meta.get("drawn_diameters_mm") if prior_lesion is not None else None
    if not isinstance(drawn, list) or not drawn or not drawn[0] or prior_measurement is None:
        return None
    long_, short = float(drawn[0]), (None if len(drawn) < 2 or drawn[1] is None else float(drawn[1]))
    if short is None and prior_measurement.is_node:
        long_, short = 0.0, long_
    return DrawnDiameters(
        radiologist_long_mm=long_ or None,
        radiologist_short_mm=short,
        ours_long_mm=float(prior_measurement.long_axis_mm),
        ours_short_mm=float(prior_measurement.short_axis_mm),
    )
