"""An arrow read as the diameter the image shows along it.

An arrow (or a probe) says where a lesion is, not how large: its tip lies on the lesion — inside it near its edge, on
its edge, or just short of it — and its tail lies outside, pointing at it. The lesion therefore runs on from the tip
along the arrow's direction, and the arrow's shaft lies on the lesion's background. On the drawn slice, along the
arrow's line (smoothed image, physical units):

1. the background level: the median along the tail half of the shaft (outside the lesion by the arrow's meaning);
2. the lesion level: the median just beyond the tip; when that is still background (a tip short of the lesion), the
   first stretch beyond the tip that departs from the background by several noise SDs;
3. the half-way level between the two separates lesion from background; the lesion's chord along the arrow runs from
   where the profile crosses it behind the lesion level's stretch (towards the tail) to where it crosses it again
   beyond (a part-solid nodule's solid core beyond a ground-glass tip counts: it lies on the lesion's side);
4. the chord's middle, re-centred across the arrow on the chord perpendicular to it (an arrow need not aim at the
   centre), gives the lesion's diameter along the arrow's direction — a line drawing, for which
   :mod:`models.segmentation.from_drawing` and the choice in :func:`pipeline.science.drawn_priors.drawn_lesion` are
   made (the line's extent through the slices comes from the image).

No chord (a shaft on tissue like the lesion's, no contrast, no crossing within reach) gives None: the caller falls
back to growing the lesion from the tip's neighbourhood.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.drawing import Drawing, DrawingKind
from lesiontrack.models.segmentation.from_drawing import _dominant_level, _split_keep


@dataclass(frozen=True)
class ArrowConfig:
    smoothing_mm: float = 1.0
    step_mm: float = 0.5
    reach_mm: float = 60.0  # a lesion's far edge lies within this distance beyond the tip
    scales_mm: tuple[float, ...] = (6.0, 9.0, 13.5, 20.0, 30.0, 45.0, 60.0)  # the discs a lesion is sought in
    min_shaft_mm: float = 4.0  # a shorter shaft gives no background
    tip_window_mm: float = 3.0  # the lesion level: the median over this stretch
    min_cnr: float = 2.0  # lesion vs background, in noise SDs
    tip_short_mm: float = 5.0  # a tip short of its lesion lies at most this far from it
    min_sd_hu: float = 6.0
    rim_mm: tuple[float, float] = (1.5, 4.0)  # the band outside the lesion looked at for a fainter part
    min_fill: float = 0.4  # a cross-section fills at least this much of the disc its long diameter spans
    rim_apart: float = 0.2  # a fainter part lies this fraction of the contrast away from both levels
    rim_spread: float = 0.12  # ... and its values spread by at most this fraction of the contrast (robust SD)


def arrow_as_line(image: Volume, drawing: Drawing, cfg: ArrowConfig | None = None) -> Drawing | None:
    """The longest diameter of the lesion ``drawing`` (an arrow, tip first, tail second) points at, as a line
    :class:`Drawing` on the drawn slice; None when the image shows no lesion there (see the module's steps)."""
    cfg = cfg or ArrowConfig()
    if drawing.kind is not DrawingKind.ARROW or len(drawing.parts[0]) < 2:
        return None
    sp = image.spacing[::-1].astype(float)
    kji = image.patient_to_index(drawing.parts[0][:2])[:, ::-1]
    k0 = int(np.rint(kji[0, 0]))
    if not 0 <= k0 < image.shape[0]:
        return None
    tip, tail = kji[0, 1:] * sp[1:], kji[1, 1:] * sp[1:]  # in-plane mm (j, i)
    shaft = float(np.linalg.norm(tip - tail))
    if shaft < cfg.min_shaft_mm:
        return None
    u = (tip - tail) / shaft
    plane = ndi.gaussian_filter(image.array[k0].astype(np.float32), sigma=cfg.smoothing_mm / sp[1:])
    found = _levels_along(_Profile(plane, sp[1:], cfg.step_mm), tip, u, shaft, cfg)
    if found is None:
        return None
    levels, start = found
    region = _region(plane, levels, start, sp[1:], cfg)
    if region is None:
        return None
    fainter = _fainter_rim(plane, region, levels, sp[1:], cfg)
    if fainter is not None:  # a part-solid lesion: its fainter rim (ground glass) around the denser part
        wider = _region(plane, fainter, start, sp[1:], cfg)
        region = wider if wider is not None else region
    a, b = _feret_ends(region, sp[1:])
    pts = np.array([[k0, *(a / sp[1:])], [k0, *(b / sp[1:])]])
    line = image.index_to_patient(pts[:, ::-1])
    return Drawing(DrawingKind.LINE, [line], f"{drawing.what or 'arrow'}: the diameter of the lesion at its tip")


def _region(
    plane: np.ndarray, levels: _Levels, start: np.ndarray, sp2: np.ndarray, cfg: ArrowConfig
) -> np.ndarray | None:
    """The lesion's cross-section: the lesion-side pixels connected to ``start`` (mm), split from what touches them
    at a neck, within the smallest of growing discs around ``start`` that holds them whole (a vessel or wall running
    on from the lesion leaves every disc; the lesion does not); None when none does."""
    jj, ii = np.meshgrid(np.arange(plane.shape[0]) * sp2[0], np.arange(plane.shape[1]) * sp2[1], indexing="ij")
    dist = np.hypot(jj - start[0], ii - start[1])
    seed = np.zeros(plane.shape, bool)
    px = np.clip(np.rint(start / sp2).astype(int), 0, np.asarray(plane.shape) - 1)
    seed[tuple(px)] = True
    side = levels.lesion_side(plane)
    if not side[tuple(px)]:
        return None
    for r in cfg.scales_mm:
        disc = dist <= r
        region = _split_keep(side & disc, seed, sp2, min_share=0.0)
        if region.any() and not (region & ~ndi.binary_erosion(disc)).any():
            region = np.asarray(ndi.binary_fill_holes(region))
            return region if _compact(region, sp2, cfg.min_fill) else None
    return None


def _compact(region: np.ndarray, sp2: np.ndarray, min_fill: float) -> bool:
    """Whether ``region`` fills at least ``min_fill`` of the disc its longest diameter spans (a lesion's
    cross-section is compact; one that ran on into a vessel, a wall or a neighbour is not)."""
    a, b = _feret_ends(region, sp2)
    feret = float(np.linalg.norm(b - a))
    return float(region.sum()) * float(np.prod(sp2)) >= min_fill * np.pi / 4 * feret**2


def _fainter_rim(
    plane: np.ndarray, region: np.ndarray, levels: _Levels, sp2: np.ndarray, cfg: ArrowConfig
) -> _Levels | None:
    """Levels for a lesion of two tissues: when most of a band just outside ``region`` (1.5–4 mm) lies between the
    background and the lesion level, well apart from both, that band is the lesion's fainter part (a part-solid
    nodule's ground glass around its solid core), and the lesion is what differs from the background by half as
    much; None otherwise (a band of background, or of partial volume only)."""
    band = _dilate(region, cfg.rim_mm[1], sp2) & ~_dilate(region, cfg.rim_mm[0], sp2)
    vals = plane[band]
    if vals.size < 8:
        return None
    lo, hi = sorted((levels.background, levels.lesion))
    gap = cfg.rim_apart * (hi - lo)
    between = (vals > lo + gap) & (vals < hi - gap)
    if between.mean() < 0.5:
        return None
    # one tissue of its own (its values gathered at one level), not a soft edge's ramp from one level to the other
    rim = vals[between]
    level = float(np.median(rim))
    if 1.4826 * float(np.median(np.abs(rim - level))) > cfg.rim_spread * (hi - lo):
        return None
    return _Levels(level, levels.background)


def _dilate(mask: np.ndarray, radius_mm: float, sp2: np.ndarray) -> np.ndarray:
    return np.asarray(ndi.distance_transform_edt(~mask, sampling=sp2) <= radius_mm)


def _feret_ends(mask: np.ndarray, sp2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two boundary points of ``mask`` farthest apart, in mm, out to the pixels' edges."""
    pts = np.argwhere(mask & ~ndi.binary_erosion(mask)).astype(float) * sp2
    if len(pts) < 2:
        c = np.argwhere(mask).mean(0) * sp2
        return c - sp2 / 2, c + sp2 / 2
    if len(pts) > 600:
        pts = pts[:: len(pts) // 600 + 1]
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    a, b = pts[i], pts[j]
    u = (b - a) / max(float(np.linalg.norm(b - a)), 1e-6)
    half = 0.5 * float(np.min(sp2))
    return a - half * u, b + half * u


class _Profile:
    """Samples of a smoothed plane along in-plane rays (bilinear; mm coordinates (j, i))."""

    def __init__(self, plane: np.ndarray, sp2: np.ndarray, step_mm: float) -> None:
        self.plane, self.sp2, self.step = plane, sp2, step_mm

    def along(self, start: np.ndarray, u: np.ndarray, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
        t = np.arange(t0, t1 + 1e-9, self.step)
        pts = (start[None] + t[:, None] * u[None]) / self.sp2
        inside = np.all((pts >= 0) & (pts <= np.asarray(self.plane.shape) - 1), axis=1)
        t, pts = t[inside], pts[inside]
        vals = ndi.map_coordinates(self.plane, pts.T, order=1, mode="nearest")
        return t, np.asarray(vals, float)


@dataclass(frozen=True)
class _Levels:
    lesion: float
    background: float

    @property
    def threshold(self) -> float:
        return 0.5 * (self.lesion + self.background)

    def lesion_side(self, v: np.ndarray) -> np.ndarray:
        bright = self.lesion > self.background
        return np.asarray(v >= self.threshold) if bright else np.asarray(v <= self.threshold)


def _levels_along(
    profile: _Profile, tip: np.ndarray, u: np.ndarray, shaft: float, cfg: ArrowConfig
) -> tuple[_Levels, np.ndarray] | None:
    """The lesion's and the background's levels along the arrow and where (in-plane mm) the lesion begins."""
    t, v = profile.along(tip, u, -shaft, cfg.reach_mm)
    w = max(round(cfg.tip_window_mm / profile.step), 1)
    ahead = t >= 0
    back = v[t <= -cfg.tip_window_mm / 2]
    if back.size < w or ahead.sum() < w:
        return None
    tt, vv = t[ahead], v[ahead]
    tip_level = float(np.median(vv[:w]))
    tip_sd = max(1.4826 * float(np.median(np.abs(vv[:w] - tip_level))), cfg.min_sd_hu)
    # the background: the most frequent tissue along the shaft, of what is not like the tip's
    unlike = back[np.abs(back - tip_level) > 3.0 * tip_sd]
    bg = _dominant_level(unlike if unlike.size >= w else back)
    near_bg = back[np.abs(back - bg) <= 100.0]
    noise = max(1.4826 * float(np.median(np.abs(near_bg - bg))) if near_bg.size else 0.0, cfg.min_sd_hu)
    # the lesion begins at the tip, or at the first stretch just beyond it that departs from the background
    off = np.abs(vv - bg) > cfg.min_cnr * noise
    run = np.convolve(off.astype(int), np.ones(w, int), mode="valid") == w
    run &= tt[: run.size] <= cfg.tip_short_mm
    if abs(tip_level - bg) >= cfg.min_cnr * noise:
        first = 0
    elif run.any():
        first = int(np.argmax(run))
    else:
        return None
    levels = _Levels(float(np.median(vv[first : first + w])), bg)
    if abs(levels.lesion - bg) < cfg.min_cnr * noise:
        return None
    return levels, tip + u * float(tt[first] + cfg.tip_window_mm / 2)
