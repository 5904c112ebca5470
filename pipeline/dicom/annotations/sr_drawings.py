"""The drawing behind a TID 1500 measurement group (OHIF / cornerstone tools, dcmjs, highdicom, other viewers):
SCOORD or SCOORD3D shapes in patient mm → one :class:`~models.segmentation.drawing.Drawing`.

Classification by geometry, with the concept as a hint (prior-annotations reference, §3): a long axis + short axis
pair is BIDIRECTIONAL; a 2-point POLYLINE under the arrow concept (DCM 111010, OHIF's ArrowAnnotate, tip first) or a
POINT item holding 2 points (cornerstone3D before v4.15.17) is an ARROW; any other 2-point POLYLINE is a LINE
(Length); ELLIPSE is an ellipse, CIRCLE (centre, rim) one too; a POLYLINE / POLYGON of 3 or more points is a CONTOUR
(a closed freehand or rectangle, first point repeated or not); POINT is a point. OHIF's moved text box (SCOORD POINT
named 99CS3D "TextPosition") is not geometry of the lesion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from lesiontrack.models.segmentation.drawing import Drawing, DrawingKind
from lesiontrack.pipeline.dicom.annotations.common import circle_as_ellipse

LONG_AXIS = {("103339001", "SCT"), ("G-A185", "SRT")}
SHORT_AXIS = {("103340004", "SCT"), ("G-A186", "SRT")}
ARROW_CONCEPT = {("111010", "DCM")}


class ShapeLike(Protocol):
    """What is read of one SCOORD / SCOORD3D (``pipeline.dicom.sr.reader.Shape``)."""

    graphic_type: str
    points_mm: np.ndarray | None
    purpose: tuple[str, str] | None


def drawing_from_shapes(
    shapes: Sequence[ShapeLike], normal: np.ndarray, what: str
) -> tuple[Drawing | None, str | None]:
    """(drawing, None) or (None, why not) for the shapes (``pipeline.dicom.sr.reader.Shape``) of one lesion."""
    usable = [
        s
        for s in shapes
        if s.points_mm is not None and len(s.points_mm) and not (s.purpose and s.purpose[1] == "99CS3D")
    ]
    if not usable:
        return None, "no coordinates in a known image or frame of reference"
    pts = [np.asarray(s.points_mm, float) for s in usable]
    types = [str(s.graphic_type) for s in usable]
    purposes = [s.purpose for s in usable]
    both = list(zip(pts, types, purposes, strict=True))
    for reader in (_bidirectional, _outline, _line, _points):
        drawing = reader(both, normal, what)
        if drawing is not None:
            return drawing, None
    return None, f"unsupported graphic type(s) {sorted(set(types))}"


_Item = tuple[np.ndarray, str, tuple[str, str] | None]  # points, graphic type, purpose


def _bidirectional(both: list[_Item], normal: np.ndarray, what: str) -> Drawing | None:
    """Long and short axis (by their concepts, or the longer of two diameters)."""
    longs = [p for p, t, c in both if t == "POLYLINE" and len(p) == 2 and c in LONG_AXIS]
    shorts = [p for p, t, c in both if t == "POLYLINE" and len(p) == 2 and c in SHORT_AXIS]
    if longs and shorts:
        return Drawing(DrawingKind.BIDIRECTIONAL, [longs[0], shorts[0]], what)
    lines = [p for p, t, _c in both if t == "POLYLINE" and len(p) == 2]
    if len(lines) == 2 and not longs:  # two diameters without the axis concepts: the longer is the long axis
        a, b = sorted(lines, key=lambda p: -float(np.linalg.norm(p[1] - p[0])))
        return Drawing(DrawingKind.BIDIRECTIONAL, [a, b], what)
    return None


def _outline(both: list[_Item], normal: np.ndarray, what: str) -> Drawing | None:
    """An ellipse, a circle or a closed outline."""
    for p, t, _c in both:
        if t == "ELLIPSE" and len(p) == 4:
            return Drawing(DrawingKind.ELLIPSE, [p], what)
        if t == "CIRCLE" and len(p) == 2:
            return Drawing(DrawingKind.ELLIPSE, [circle_as_ellipse(p[0], p[1], normal)], what)
        if t in ("POLYLINE", "POLYGON") and len(p) >= 3:
            closed = p[:-1] if np.linalg.norm(p[-1] - p[0]) < 1e-3 else p
            if len(closed) >= 3:
                return Drawing(DrawingKind.CONTOUR, [closed], what)
    return None


def _line(both: list[_Item], normal: np.ndarray, what: str) -> Drawing | None:
    """A single diameter, or an arrow (by its concept, or an older cornerstone arrow: tip, tail)."""
    for p, t, c in both:
        if t == "POLYLINE" and len(p) == 2:
            return Drawing(DrawingKind.ARROW if c in ARROW_CONCEPT else DrawingKind.LINE, [p], what)
        if t == "POINT" and len(p) == 2:
            return Drawing(DrawingKind.ARROW, [p], what)
    return None


def _points(both: list[_Item], normal: np.ndarray, what: str) -> Drawing | None:
    """A point (an arrow's tip when a point says it is one)."""
    points = [p for p, t, _c in both if t in ("POINT", "MULTIPOINT")]
    if not points:
        return None
    arrow = any(c in ARROW_CONCEPT for _p, t, c in both if t == "POINT")
    return Drawing(DrawingKind.ARROW if arrow else DrawingKind.POINT, [points[0][:1]], what)
