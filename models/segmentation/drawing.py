"""What a radiologist drew on one image, in patient mm: a diameter, a bidirectional pair, an arrow, a point, an
ellipse or a closed contour (the 2-D annotations of TID 1500 SR, GSPS and single-slice RTSTRUCT contours).

A :class:`Drawing` travels in ``Prompt.meta["drawing"]`` next to the prompt's box / points (which engines that do
not read drawings use as before); :mod:`models.segmentation.from_drawing` turns it into a 3-D lesion whose extent
through the slices comes from the image, not from the drawing's in-plane size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np


class DrawingKind(StrEnum):
    LINE = "line"  # one diameter: RECIST long axis (or a node's short axis)
    BIDIRECTIONAL = "bidirectional"  # long axis + short axis
    ARROW = "arrow"  # tip first, then the tail (when known)
    POINT = "point"  # a click / probe on the lesion
    ELLIPSE = "ellipse"  # drawn around the lesion: major-axis ends, then minor-axis ends (circles converted so)
    CONTOUR = "contour"  # a closed outline of the lesion on one image (polyline, freehand, RTSTRUCT contour)


#: Confidence in a lesion derived from each kind of drawing before a person confirms it (1 = a 3-D mask).
WEAK_PRIOR_SCORE: dict[DrawingKind, float] = {
    DrawingKind.CONTOUR: 0.8,
    DrawingKind.ELLIPSE: 0.7,
    DrawingKind.BIDIRECTIONAL: 0.7,
    DrawingKind.LINE: 0.65,
    DrawingKind.ARROW: 0.45,
    DrawingKind.POINT: 0.45,
}


@dataclass
class Drawing:
    """One lesion's 2-D annotation. ``parts``: (N, 3) LPS mm arrays — LINE: one 2-point part; BIDIRECTIONAL: long
    then short axis; ARROW: one part, tip first (tail second when known); POINT: one 1-point part; ELLIPSE: one
    4-point part (major ends, minor ends); CONTOUR: one closed polygon (first point not repeated)."""

    kind: DrawingKind
    parts: list[np.ndarray]
    what: str = ""  # where it came from, for messages: "GSPS 1.2.3 layer MEASUREMENTS object 2"
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.parts = [np.asarray(p, np.float64).reshape(-1, 3) for p in self.parts]
        need = {
            DrawingKind.LINE: (1, 2),
            DrawingKind.BIDIRECTIONAL: (2, 2),
            DrawingKind.ELLIPSE: (1, 4),
        }
        if not self.parts or any(len(p) == 0 for p in self.parts):
            raise ValueError(f"{self.what or self.kind.value}: a drawing without points")
        if self.kind in need:
            n_parts, n_pts = need[self.kind]
            if len(self.parts) != n_parts or any(len(p) != n_pts for p in self.parts):
                raise ValueError(
                    f"{self.what or self.kind.value}: a {self.kind.value} needs {n_parts} part(s) of {n_pts} points"
                )
        if self.kind is DrawingKind.CONTOUR and len(self.parts[0]) < 3:
            raise ValueError(f"{self.what or self.kind.value}: a contour needs at least 3 points")

    @property
    def all_points(self) -> np.ndarray:
        return np.concatenate(self.parts)

    def anchor_mm(self) -> np.ndarray:
        """Where the lesion is: the tip of an arrow, the point, else the centre of the drawing."""
        if self.kind in (DrawingKind.ARROW, DrawingKind.POINT):
            return self.parts[0][0].copy()
        if self.kind in (DrawingKind.LINE, DrawingKind.BIDIRECTIONAL, DrawingKind.ELLIPSE):
            return np.asarray(self.parts[0].mean(0))
        return np.asarray(self.all_points.mean(0))

    def diameters_mm(self) -> tuple[float, float | None]:
        """The radiologist's own (long, short) diameters; (0, None) for an arrow or a point."""
        if self.kind in (DrawingKind.ARROW, DrawingKind.POINT):
            return 0.0, None
        if self.kind is DrawingKind.CONTOUR:
            pts = self.parts[0]
            d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
            return float(d.max()), None
        lengths = [float(np.linalg.norm(p[1] - p[0])) for p in self.parts]
        if self.kind is DrawingKind.ELLIPSE:
            lengths = [
                float(np.linalg.norm(self.parts[0][1] - self.parts[0][0])),
                float(np.linalg.norm(self.parts[0][3] - self.parts[0][2])),
            ]
        long_ = max(lengths)
        return long_, (min(lengths) if len(lengths) > 1 else None)

    def box_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """A 3-D box for engines that do not read drawings (as the SR reader always built it): the in-plane extent,
        and across the drawn plane the mean in-plane extent (a single line: its length)."""
        pts = self.all_points
        if self.kind in (DrawingKind.ARROW, DrawingKind.POINT):
            c = self.anchor_mm()
            return c - 5.0, c + 5.0
        lo, hi = pts.min(0), pts.max(0)
        ext = hi - lo
        flat = ext < 1.0
        if self.kind is DrawingKind.LINE or not (~flat).any():
            half = np.full(3, float(ext.max()) / 2)
        else:
            half = np.where(flat, float(ext[~flat].mean()) / 2, ext / 2)
        c = (lo + hi) / 2
        return c - half, c + half
