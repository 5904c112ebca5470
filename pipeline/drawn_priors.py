"""Priors a radiologist drew on one image (a line, an arrow, an ellipse, a contour): the 3-D lesion on the annotated
CT, where each prompt came from, and the lower confidence of what follows from it until a person confirms it.

* :func:`drawn_lesion` — the lesion a prompt's drawing (``Prompt.meta["drawing"]``, set by the SR, GSPS and
  RTSTRUCT readers) marks, by :func:`models.segmentation.from_drawing.lesion_from_drawing`; when the image gives no
  lesion there, the engine segments the drawing's box as before, and the notes say so;
* :func:`prompt_origin_meta` — ``prompt_origin`` (``seg``, ``contours``, ``line``, ``arrow``, …) and ``weak_prior``
  for the tracked lesion's meta (the SR and the dashboard show them);
* :func:`weaken_for_origin` — a follow-up result propagated from a weak prior gets the ``prompt_origin`` signal
  (:data:`models.segmentation.drawing.WEAK_PRIOR_SCORE`), so an arrow's lesion is flagged for review.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from models.imaging.volume import Volume
from models.segmentation.drawing import WEAK_PRIOR_SCORE, Drawing, DrawingKind
from models.segmentation.prompts import Prompt, PromptKind
from pipeline.confidence import ConfidenceRules, LesionConfidence, Signal, with_signal


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


def drawn_lesion(ct: Volume, prompt: Prompt, engine: Any) -> DrawnLesion | None:
    """The 3-D lesion the prompt's drawing marks on ``ct``; None for a prompt without a drawing."""
    from models.segmentation.from_drawing import lesion_from_drawing

    drawing = drawing_of(prompt)
    if drawing is None:
        return None
    mask, notes = lesion_from_drawing(ct, drawing, engine)
    name = "drawing"
    if mask is not None and any("refined by" in n for n in notes):
        name = f"drawing+{getattr(engine, 'name', 'engine')}"
    if mask is None:
        notes.append(f"segmented the {drawing.kind.value}'s box with {getattr(engine, 'name', 'the engine')} instead")
        mask = engine.segment(ct, prompt, None)
        name = str(getattr(engine, "name", "engine"))
    return DrawnLesion(mask, drawing.kind.value, name, str(getattr(engine, "version", "")), notes)


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
    if d is not None:
        long_, short = d.diameters_mm()
        if long_ > 0:  # the radiologist's own diameters, reported beside ours
            out["drawn_diameters_mm"] = [round(long_, 1), None if short is None else round(short, 1)]
        if d.what:
            out["drawn"] = d.what
    return out


def weaken_for_origin(
    conf: LesionConfidence, source_lesions: Sequence[Any], label: int, rules: ConfidenceRules | None
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
