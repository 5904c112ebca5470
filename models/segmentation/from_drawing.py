"""A 3-D lesion from a 2-D drawing (a diameter, a bidirectional pair, an arrow, a point, an ellipse, a contour).

The drawing fixes the lesion on its slice; how far the lesion reaches through the neighbouring slices comes from the
image, not from the drawing's in-plane size (a prompt box as deep as the line is long flattens a small nodule on
5 mm slices to one slice). Steps, on a region around the drawing (physical units throughout):

1. On the drawn slice: a *core* known to be lesion (the middle of a diameter, the inside of an ellipse or contour
   shrunk to half, a small disc at an arrow's tip or a point) and a *bound* the lesion cannot leave (a disc of 0.6 x
   the diameter around its middle — the diameter is the longest chord —, the drawn ellipse or contour widened a
   little, 25 mm around a point).
2. Intensity statistics sampled on the drawing: the lesion level from the core (a low quantile towards the
   background, so a part-solid nodule's ground-glass rim counts), the background as the most frequent tissue in a ring
   just outside the bound; the half-way level between the two separates lesion from background (partial-volume
   correct: a voxel is lesion when at least half of it is).
3. On the drawn slice, the lesion-side voxels inside the bound connected to the core; then slice by slice away from
   it, the lesion-side voxels within one voxel of the previous slice's cross-section (a lesion's cross-section
   changes gradually), never more than a little larger than the previous one (the drawn slice is where the lesion is
   largest: a radiologist measures there), inside the ellipsoid the drawn diameter spans (a sphere of 1.1 x that
   diameter, half a slice deeper), until nothing is left. Intermediate values count as the lesion's partial-volume
   edge only next to tissue like the core's (a thick band of them is another tissue, e.g. the chest wall), and each
   cross-section is split at its necks (watershed) so a vessel touching the lesion is left out.
4. For an arrow or a point (whose extent is unknown) the segmentation engine refines that seed as a mask prompt;
   the result is kept when it overlaps the seed, else the seed. A diameter, an ellipse or a contour bounds the lesion
   better than the refinement (measured: bench/annotations.py, docs/benchmarks.md).

A *faint* lesion — a diameter or an ellipse on a lesion whose contrast with its surroundings' most frequent tissue is
within 2.5 x that tissue's voxel spread (a liver metastasis a few tens of HU from its liver on a noisy CT) — is read on
a smoothed image instead: step 2's ring would otherwise leave out its background as "like the core" and measure the
lesion against the fat or bone beyond the organ, and every voxel of the organ in the bound would be lesion. The image
is smoothed with a Gaussian of 0.1 x the drawn diameter (small against the lesion, wide enough to average the noise);
the ring's most frequent tissue is then the background when it differs from the core's level by 2 noise SDs and the
tissue just beyond the drawn diameter's ends (where the radiologist saw the lesion end) is on its side of the core's
level. The lesion is then segmented on an in-plane smoothing over its own and its background's tissue only (voxels
within 3 contrasts of their levels: fat or bone beside the organ is neither blurred in nor lesion), and a
cross-section smaller than the smoothing's width ends it through the slices (smaller is noise at that smoothing).

Too little contrast between the core and the background (< 2 noise SDs) gives no seed: the caller falls back to the
drawing's box and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.components import bbox, connected_to, dilate_mm
from lesiontrack.models.segmentation.drawing import Drawing, DrawingKind
from lesiontrack.models.segmentation.levels import dominant_level, robust_sd
from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt, PromptKind


@dataclass(frozen=True)
class DrawingConfig:
    smoothing_mm: float = 0.8
    bound_factor: float = 0.55  # in-plane bound: this x the diameter around its middle
    ellipse_margin: float = 1.15  # a drawn ellipse/contour is widened by this factor (+ a voxel) as bound
    point_reach_mm: float = 25.0  # an arrow's or point's lesion lies within this distance of the tip
    tip_core_mm: float = 2.5
    ring_mm: float = 5.0
    lesion_quantile: float = 0.2  # of the core samples, towards the background
    min_cnr: float = 2.0
    growth_per_slice: float = 1.15  # a cross-section may exceed the previous one by at most this area factor
    depth_factor: float = 0.75  # through-slice search from the drawn slice: this x the long diameter (+ one slice)
    max_depth_factor: float = 1.5  # an elongated lesion is followed at most this x its drawn diameter either way
    depth_from_width: bool = True
    elongated_fraction: float = 10.0
    """A cross-section at least this x the drawn one is followed beyond the ellipsoid (off by default: on our
    benchmark it followed vessels and walls running on from a lesion more often than elongated lesions)."""
    min_sd_hu: float = 6.0
    faint_smoothing: float = 0.1  # a faint lesion is smoothed with a Gaussian of this x the drawn long diameter (mm)
    edge_reach: float = 0.25  # the tissue just beyond a diameter's end: out to this x its length (>= 2 pixels)


@dataclass
class DrawnSeed:
    """The seed mask on the image grid and what it was built from (for notes and tests)."""

    mask: Volume
    lesion_level: float
    background_level: float
    slices: int


def seed_from_drawing(image: Volume, drawing: Drawing, cfg: DrawingConfig | None = None) -> DrawnSeed | None:
    """The lesion's seed mask from ``drawing`` on ``image`` (steps 1–3), or None when the image does not support it
    (drawing outside the CT, no contrast)."""
    cfg = cfg or DrawingConfig()
    sp = image.spacing[::-1].astype(float)  # (k, j, i) mm
    kji = image.patient_to_index(drawing.all_points)[:, ::-1]
    k0 = int(np.rint(kji[:, 0].mean()))
    if not 0 <= k0 < image.shape[0]:
        return None
    parts = [image.patient_to_index(p)[:, ::-1] for p in drawing.parts]
    long_mm, short_mm = drawing.diameters_mm()
    reach = cfg.point_reach_mm if long_mm <= 0 else cfg.bound_factor * long_mm * cfg.ellipse_margin
    depth_mm = cfg.point_reach_mm if long_mm <= 0 else cfg.max_depth_factor * long_mm + sp[0]
    roi = _roi(image.shape, kji, k0, (depth_mm + 2 * sp[0], reach), cfg, sp)
    if roi is None:
        return None
    sl, lo = roi
    raw = image.array[sl].astype(np.float32)
    smooth = ndi.gaussian_filter(raw, sigma=cfg.smoothing_mm / sp)
    kk = k0 - lo[0]
    local = [p - lo for p in parts]
    plane = smooth[kk]
    jj, ii = np.meshgrid(np.arange(plane.shape[0]) * sp[1], np.arange(plane.shape[1]) * sp[2], indexing="ij")
    in_plane = [p[:, 1:] * sp[1:] for p in local]
    core, bound = _core_and_bound(drawing.kind, in_plane, jj, ii, cfg, sp)
    if not core.any() or not bound.any():
        return None
    les_s = plane[core]
    tol0 = max(2.5 * robust_sd(les_s), 2.5 * cfg.min_sd_hu, 25.0)  # the core's tolerance on the smoothed slice
    point_like = drawing.kind in (DrawingKind.ARROW, DrawingKind.POINT)
    if point_like:  # the extent is unknown: the tissue like the tip's around it, and a little more, bounds it
        med, tol = float(np.median(les_s)), tol0
        grown = _split_keep((np.abs(plane - med) <= tol) & bound, core, sp[1:], min_share=0.0) | core
        bound = dilate_mm(grown, 1.5 * float(max(sp[1], sp[2])), sp[1:]) & bound
    ring_out = dilate_mm(bound, cfg.ring_mm + 1.5, sp[1:]) & ~dilate_mm(bound, 1.5, sp[1:])
    if ring_out.sum() < 10:
        return None
    edge = _beyond_ends(drawing.kind, in_plane, jj, ii, cfg, sp)
    faint = _faint_levels(raw, kk, (plane, core, tol0), (ring_out, edge), cfg, sp, long_mm) if long_mm > 0 else None
    tissue = None
    if faint is not None:  # a faint lesion: its own image (smoothed over its and its background's tissue)
        smooth, tissue = _faint_image(raw, faint, cfg.faint_smoothing * long_mm, sp, cfg)
        les_s = smooth[kk][core]
    core_med, core_tol = float(np.median(les_s)), max(2.5 * robust_sd(les_s), 2.5 * cfg.min_sd_hu, 25.0)
    levels = faint or _levels(plane, les_s, ring_out, (core_med, core_tol), cfg)
    if levels is None:
        return None
    lesion_like = _lesion_side(smooth, levels, (core_med, core_tol), tissue)
    if point_like:  # only tissue like the tip's (a vessel or wall brighter than the lesion is not it)
        lesion_like &= np.abs(smooth - med) <= max(tol, 0.5 * abs(med - levels[1]))
    # the drawn slice
    if drawing.kind is DrawingKind.CONTOUR:  # the radiologist's own outline of this slice
        m0 = _polygon(local[0][:, 1:] * sp[1:], jj, ii, sp)
    else:
        m0 = _split_keep(lesion_like[kk] & bound, core, sp[1:], min_share=0.0)
    if not m0.any():
        m0 = core.copy()
    m0 = ndi.binary_fill_holes(m0)
    seed = np.zeros(smooth.shape, bool)
    seed[kk] = m0
    limits = _slice_limits(m0, (long_mm, short_mm, depth_mm), np.stack([jj, ii], -1), faint is not None, cfg, sp)
    n_slices = 1 + _propagate(seed, m0, kk, lesion_like, bound, sp, cfg, limits)
    out = np.zeros(image.shape, np.uint8)
    out[sl] = seed
    return DrawnSeed(image.with_array(out), levels[0], levels[1], n_slices)


def _roi(
    shape: tuple[int, ...], kji: np.ndarray, k0: int, extent_mm: tuple[float, float], cfg: DrawingConfig, sp: np.ndarray
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """The region of interest around the drawing (``extent_mm``: half depth, in-plane reach) as slices
    and its lower corner, or None when it is too thin."""
    centre = np.asarray([k0, *kji[:, 1:].mean(0)])
    reach = float(extent_mm[1])
    half = np.array([extent_mm[0], reach + cfg.ring_mm + 4.0, reach + cfg.ring_mm + 4.0]) / sp
    half[1:] = np.maximum(half[1:], (np.abs(kji[:, 1:] - centre[1:]).max(0) + (cfg.ring_mm + 4.0) / sp[1:]))
    lo = np.maximum(np.floor(centre - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, np.array(shape))
    if np.any(hi - lo < 2):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True)), lo


def _levels(
    plane: np.ndarray, les_s: np.ndarray, ring_out: np.ndarray, core: tuple[float, float], cfg: DrawingConfig
) -> tuple[float, float, bool] | None:
    """The lesion's and the background's levels on the drawn slice and whether the lesion is the brighter; None
    when their contrast is below ``cfg.min_cnr`` times the noise. ``core`` = the core's median and tolerance."""
    ring_s = plane[ring_out]
    # ring voxels like the core are the lesion running on (or a neighbour of its density), not its background
    core_med, core_tol = core
    unlike = ring_s[np.abs(ring_s - core_med) > core_tol]
    bg_level = dominant_level(unlike if unlike.size >= 20 else ring_s)
    bright = float(np.median(les_s)) > bg_level
    # the lesion's level: its median, or, for a lesion of two tissues (a part-solid nodule's ground glass and solid
    # core), a low quantile towards the background, so that the fainter tissue counts
    les_level = float(np.median(les_s))
    if robust_sd(les_s) > 0.25 * abs(les_level - bg_level):
        q = cfg.lesion_quantile if bright else 1.0 - cfg.lesion_quantile
        les_level = float(np.quantile(les_s, q))
    # the image noise: the narrower of the core's and the ring's robust spreads (a ring across tissues is wide)
    ring_sd = robust_sd(plane[ring_out & (np.abs(plane - bg_level) <= 100.0)])
    noise = max(min(ring_sd, robust_sd(les_s)) if les_s.size >= 5 else ring_sd, cfg.min_sd_hu)
    if abs(les_level - bg_level) < cfg.min_cnr * noise:
        # the quantile may sit on partial volume: try the core's median before giving up
        les_level = float(np.median(les_s))
        if abs(les_level - bg_level) < cfg.min_cnr * noise:
            return None
    return les_level, bg_level, bright


def _ring_tissue(ring_s: np.ndarray, les_s: np.ndarray) -> tuple[float, float, float, float]:
    """The ring's most frequent tissue: its level and spread (the median and robust SD of the ring voxels within 2.5
    SDs of it, clipped three times from the histogram's mode, so another tissue's partial volume is left out), its
    contrast with the core (``les_s``) and the noise (the narrower of the core's and that tissue's robust spreads, as
    :func:`_levels`)."""
    level = dominant_level(ring_s)
    near = ring_s[np.abs(ring_s - level) <= 100.0]
    sd = robust_sd(near) if near.size >= 10 else robust_sd(ring_s)
    for _ in range(3):
        win = ring_s[np.abs(ring_s - level) <= max(2.5 * sd, 3.0)]
        if win.size < 10:
            break
        level, sd = float(np.median(win)), robust_sd(win)
    noise = min(sd, robust_sd(les_s)) if les_s.size >= 5 else sd
    return level, sd, abs(level - float(np.median(les_s))), noise


def _lesion_side(
    smooth: np.ndarray,
    levels: tuple[float, float, bool],
    core: tuple[float, float],
    tissue: np.ndarray | None,
) -> np.ndarray:
    """The voxels on the lesion's side of the half-way level between ``levels`` (lesion, background, whether the
    lesion is the brighter) — an intermediate value only next to tissue like the core's (``core``: its median and
    tolerance): a thick band of it is another tissue (the chest wall beside a juxtapleural nodule, between lung and
    nodule in density) — and, for a faint lesion, within its and its background's ``tissue``."""
    les_level, bg_level, bright = levels
    threshold = 0.5 * (les_level + bg_level)
    lesion_like = (smooth >= threshold) if bright else (smooth <= threshold)
    like_core = np.abs(smooth - core[0]) <= core[1]
    lesion_like &= like_core | ndi.binary_dilation(like_core, structure=np.ones((3, 3, 3), bool))
    if tissue is not None:  # a tissue far beyond the lesion's level (fat at the liver's edge) is not the lesion
        lesion_like &= tissue
    return np.asarray(lesion_like)


def _faint_image(
    raw: np.ndarray, levels: tuple[float, float, bool], sigma: float, sp: np.ndarray, cfg: DrawingConfig
) -> tuple[np.ndarray, np.ndarray]:
    """A faint lesion's image, smoothed in-plane with ``sigma`` mm over its own and its background's tissue only
    (voxels within 3 x their contrast of their levels), so fat or bone beside it is not blurred into it, and that
    tissue."""
    les_level, bg_level, _ = levels
    reach = 3.0 * abs(bg_level - les_level)
    tissue = (raw >= min(les_level, bg_level) - reach) & (raw <= max(les_level, bg_level) + reach)
    return _smooth_in_plane(raw, sigma, sp, cfg, tissue), tissue


def _smooth_in_plane(
    raw: np.ndarray, sigma: float, sp: np.ndarray, cfg: DrawingConfig, tissue: np.ndarray
) -> np.ndarray:
    """``raw`` smoothed with a Gaussian of ``sigma`` mm in-plane (``cfg.smoothing_mm`` through the slices, so the
    lesion's ends stay where the image has them) over the ``tissue`` voxels only (normalised convolution)."""
    s = np.array([cfg.smoothing_mm, sigma, sigma]) / sp
    w = tissue.astype(np.float32)
    return np.asarray(ndi.gaussian_filter(raw * w, sigma=s) / np.maximum(ndi.gaussian_filter(w, sigma=s), 1e-3))


def _faint_levels(
    raw: np.ndarray,
    kk: int,
    drawn: tuple[np.ndarray, np.ndarray, float],
    around: tuple[np.ndarray, np.ndarray | None],
    cfg: DrawingConfig,
    sp: np.ndarray,
    long_mm: float,
) -> tuple[float, float, bool] | None:
    """A faint lesion's levels (lesion, background, whether the lesion is the brighter), or None for a lesion that is
    not faint. Faint: its surroundings' most frequent tissue is like it voxel by voxel (their contrast within the
    core's tolerance and 2.5 x that tissue's spread: a liver metastasis a few tens of HU from its liver on a noisy
    CT), yet on the image smoothed with a Gaussian of ``cfg.faint_smoothing`` x the drawn diameter — small against
    the lesion, wide enough to average the noise out — that tissue is another (:func:`_faint_background`).
    ``drawn``: the drawn slice smoothed with ``cfg.smoothing_mm``, the core on it and the core's tolerance there."""
    plane, core, core_tol = drawn
    ring_out, _ = around  # the ends beyond the drawing (around[1]) are for _faint_background
    les_s = plane[core]
    _, spread, contrast, _ = _ring_tissue(plane[ring_out], les_s)
    if contrast > min(core_tol, 2.5 * max(spread, cfg.min_sd_hu)):
        return None
    sigma = max(cfg.faint_smoothing * long_mm, cfg.smoothing_mm) / sp
    # only the slices the Gaussian reaches slice kk from (scipy's radius: int(4 sd + 0.5)): the same values at kk
    r = int(4.0 * float(sigma[0]) + 0.5)
    k_lo = max(kk - r, 0)
    plane = ndi.gaussian_filter(raw[k_lo : kk + r + 1], sigma=sigma)[kk - k_lo]
    les_s = plane[core]
    bg = _faint_background(plane, les_s, around, max(2.5 * robust_sd(les_s), 2.5 * cfg.min_sd_hu, 25.0), cfg)
    if bg is None:
        return None
    les = float(np.median(les_s))
    return les, bg, les > bg


def _faint_background(
    plane: np.ndarray,
    les_s: np.ndarray,
    around: tuple[np.ndarray, np.ndarray | None],
    core_tol: float,
    cfg: DrawingConfig,
) -> float | None:
    """... unless the ring's most frequent tissue, like the core voxel by voxel, is a different tissue on the smoothed
    image (a faint liver lesion in its liver): its level differs from the core's by ``cfg.min_cnr`` x the noise and
    the tissue just beyond the drawn diameters' ends — where the radiologist saw the lesion end — is on its side of
    the core's level. Its level then, else None."""
    ring_out, edge = around
    level, _, contrast, noise = _ring_tissue(plane[ring_out], les_s)
    if contrast > core_tol or contrast < cfg.min_cnr * max(noise, 1.0):
        return None
    if edge is not None:  # beyond the ends: at least a quarter of the way from the core's level to that tissue's
        core_med = float(np.median(les_s))
        beyond = float(np.median(plane[edge])) if edge.sum() >= 2 else core_med
        if (beyond - core_med) * np.sign(level - core_med) < 0.25 * contrast:
            return None
    return level


def _beyond_ends(
    kind: DrawingKind, parts: list[np.ndarray], jj: np.ndarray, ii: np.ndarray, cfg: DrawingConfig, sp: np.ndarray
) -> np.ndarray | None:
    """The pixels just beyond the ends of the drawn diameters (a line's, a bidirectional pair's) on the drawn slice,
    from a pixel out to ``cfg.edge_reach`` x the diameter (at least two pixels); None for other drawings."""
    if kind not in (DrawingKind.LINE, DrawingKind.BIDIRECTIONAL):
        return None
    xy = np.stack([jj, ii], -1)
    pix = float(max(sp[1], sp[2]))
    out = np.zeros(jj.shape, bool)
    for p in parts:
        a, b = p[0], p[1]
        length = max(float(np.linalg.norm(b - a)), 1e-6)
        near, far = pix / length, max(2.0 * pix, cfg.edge_reach * length) / length
        out |= _segment_distance(xy, a, b, 1.0 + near, 1.0 + far) <= 0.75 * pix
        out |= _segment_distance(xy, a, b, -far, -near) <= 0.75 * pix
    return out


@dataclass(frozen=True)
class _SliceLimits:
    """How far the seed may run through the slices from the drawn one."""

    depth_mm: float  # never beyond
    z_bound: float  # the ellipsoid the drawn diameter spans: its half depth (mm) ...
    r_bound: float  # ... and in-plane radius (mm)
    min_area: float  # a cross-section at least this large (voxels) is an elongated lesion, not bounded
    radial: np.ndarray  # in-plane distance (mm) of every pixel from the drawn cross-section's centre
    min_cross: float = 0.0  # a cross-section smaller than this (voxels) ends the lesion


def _slice_limits(
    m0: np.ndarray,
    drawn: tuple[float, float | None, float],
    xy: np.ndarray,
    faint: bool,
    cfg: DrawingConfig,
    sp: np.ndarray,
) -> _SliceLimits:
    """How far the seed may run through the slices from the drawn cross-section ``m0``; ``drawn`` = the drawn long
    and short diameters (mm; 0 / None: not drawn) and the search depth, ``xy`` = the drawn slice's in-plane mm."""
    long_mm, short_mm, depth_mm = drawn
    # through the slices: within the ellipsoid the drawn diameter spans (a sphere of that diameter, 20 % wider, half a
    # slice deeper); beyond it only while the cross-section stays at least half the drawn one (an elongated lesion,
    # not a vessel or wall running on from it)
    size = long_mm if long_mm > 0 else _feret_mm(m0, sp[1:])
    # a lesion long in the drawn plane is as deep as it is wide rather than as long: the through-slice reach comes
    # from the geometric mean of the long diameter and the width (the drawn short axis, else the cross-section's)
    width = min(size, short_mm if short_mm else _width_mm(m0, sp[1:]))
    depth_size = float(np.sqrt(size * width)) if cfg.depth_from_width else size
    c0 = np.argwhere(m0).mean(0) * sp[1:]
    return _SliceLimits(
        depth_mm=min(depth_mm, cfg.max_depth_factor * size),
        z_bound=cfg.bound_factor * depth_size + 0.5 * sp[0],
        r_bound=cfg.bound_factor * size + 0.5 * float(max(sp[1], sp[2])),
        min_area=cfg.elongated_fraction * float(m0.sum()),
        radial=np.linalg.norm(xy - c0, axis=-1),
        # a faint lesion's cross-section smaller than its smoothing's width (FWHM) is noise at that smoothing
        min_cross=0.0 if not faint else np.pi * (1.18 * cfg.faint_smoothing * long_mm) ** 2 / (sp[1] * sp[2]),
    )


def _propagate(
    seed: np.ndarray,
    m0: np.ndarray,
    kk: int,
    lesion_like: np.ndarray,
    bound: np.ndarray,
    sp: np.ndarray,
    cfg: DrawingConfig,
    lim: _SliceLimits,
) -> int:
    """Grow ``seed`` from the drawn slice ``kk`` (mask ``m0``) up and down; returns the slices added."""
    added = 0
    one = _disc(1.0 * max(sp[1], sp[2]) * 1.001, sp[1:])
    for step in (1, -1):
        prev = m0
        k = kk + step
        while 0 <= k < lesion_like.shape[0] and abs(k - kk) * sp[0] <= lim.depth_mm:
            z = abs(k - kk) * sp[0]
            near = ndi.binary_dilation(prev, structure=one)
            cand = _split_keep(lesion_like[k] & bound & near, prev, sp[1:], min_share=0.5)
            if cand.sum() > cfg.growth_per_slice * prev.sum() + 1:  # running into a neighbour: no growth here
                cand = connected_to(lesion_like[k] & prev, prev)
            cand = ndi.binary_fill_holes(cand)
            if float(cand.sum()) < lim.min_area:
                r = lim.r_bound * float(np.sqrt(max(0.0, 1.0 - (z / lim.z_bound) ** 2))) if z < lim.z_bound else 0.0
                cand &= lim.radial <= max(r, 0.5 * float(max(sp[1], sp[2])))
                cand = connected_to(cand, cand) if z < lim.z_bound else np.zeros_like(cand)
            if not cand.any() or float(cand.sum()) < lim.min_cross:
                break
            seed[k] = cand
            added += 1
            prev = cand
            k += step
    return added


def _core_and_bound(
    kind: DrawingKind, parts: list[np.ndarray], jj: np.ndarray, ii: np.ndarray, cfg: DrawingConfig, sp: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """In-plane core and bound (boolean images of the drawn slice); ``parts`` in in-plane mm (j, i)."""
    xy = np.stack([jj, ii], -1)
    pix = float(max(sp[1], sp[2]))
    if kind in (DrawingKind.LINE, DrawingKind.BIDIRECTIONAL):
        core = np.zeros(jj.shape, bool)
        for p in parts:
            core |= _segment_distance(xy, p[0], p[1], 0.2, 0.8) <= 0.75 * pix
        a, b = parts[0][0], parts[0][1]
        mid, length = (a + b) / 2, float(np.linalg.norm(b - a))
        bound = np.linalg.norm(xy - mid, axis=-1) <= cfg.bound_factor * length + 0.5 * pix
        if kind is DrawingKind.BIDIRECTIONAL:  # across the long axis no farther than the short axis reaches
            u = (b - a) / max(length, 1e-6)
            n = np.array([-u[1], u[0]])
            across = np.abs((xy - mid) @ n)
            c, d = parts[1][0], parts[1][1]
            reach = max(abs(float((c - mid) @ n)), abs(float((d - mid) @ n)))
            bound &= across <= cfg.ellipse_margin * reach + pix
        return core, bound
    if kind is DrawingKind.ELLIPSE:
        p = parts[0]
        centre = (p[0] + p[1]) / 2
        ax1 = (p[1] - p[0]) / 2
        ax2 = (p[3] - p[2]) / 2
        r = _ellipse_radius(xy - centre, ax1, ax2)
        return r <= 0.5, r <= 1.0 + pix / max(float(np.linalg.norm(ax2)), pix)  # drawn around the lesion
    if kind is DrawingKind.CONTOUR:
        inside = _polygon(parts[0], jj, ii, sp)
        depth = ndi.distance_transform_edt(inside, sampling=sp[1:])
        core = inside & (depth >= 0.5 * float(depth.max()))
        return core, dilate_mm(inside, max(1.5, 0.15 * float(depth.max()) * 2), sp[1:])
    # ARROW / POINT: the tip, nudged into the lesion along the arrow (the tip touches the lesion's edge)
    tip = parts[0][0].copy()
    if kind is DrawingKind.ARROW and len(parts[0]) >= 2:
        u = parts[0][0] - parts[0][1]
        if np.linalg.norm(u) > 1e-6:
            tip = tip + cfg.tip_core_mm * u / np.linalg.norm(u)
    dist = np.linalg.norm(xy - tip, axis=-1)
    return dist <= max(cfg.tip_core_mm, pix), dist <= cfg.point_reach_mm


def _segment_distance(xy: np.ndarray, a: np.ndarray, b: np.ndarray, t0: float, t1: float) -> np.ndarray:
    d = b - a
    t = np.clip(((xy - a) @ d) / max(float(d @ d), 1e-9), t0, t1)
    return np.asarray(np.linalg.norm(xy - (a + t[..., None] * d), axis=-1))


def _ellipse_radius(v: np.ndarray, ax1: np.ndarray, ax2: np.ndarray) -> np.ndarray:
    """Normalised ellipse radius of in-plane vectors ``v`` (1 on the ellipse with semi-axes ``ax1``, ``ax2``)."""
    a, b = max(float(np.linalg.norm(ax1)), 1e-6), max(float(np.linalg.norm(ax2)), 1e-6)
    u = ax1 / a
    n = np.array([-u[1], u[0]])
    return np.asarray(np.sqrt(((v @ u) / a) ** 2 + ((v @ n) / b) ** 2))


def _polygon(poly: np.ndarray, jj: np.ndarray, ii: np.ndarray, sp: np.ndarray) -> np.ndarray:
    from skimage.draw import polygon as fill  # skimage.draw/morphology load in ~1 s: only for drawn outlines/splits

    rows, cols = fill(poly[:, 0] / sp[1], poly[:, 1] / sp[2], shape=jj.shape)
    out = np.zeros(jj.shape, bool)
    out[rows, cols] = True
    if not out.any():  # smaller than a pixel: its nearest pixel
        c = np.rint(poly.mean(0) / sp[1:]).astype(int)
        if np.all(c >= 0) and np.all(c < np.asarray(out.shape)):
            out[tuple(c)] = True
    return out


def _feret_mm(mask: np.ndarray, sp2: np.ndarray) -> float:
    """Largest distance between two pixels of ``mask`` (mm, pixel edges included)."""
    pts = np.argwhere(mask & ~ndi.binary_erosion(mask)).astype(float) * sp2
    if len(pts) < 2:
        return float(max(sp2))
    if len(pts) > 400:
        pts = pts[:: len(pts) // 400 + 1]
    return float(np.linalg.norm(pts[:, None] - pts[None], axis=-1).max()) + float(max(sp2))


def _width_mm(mask: np.ndarray, sp2: np.ndarray) -> float:
    """Full width of ``mask`` across its long axis (mm): 4 x the root of the smaller second moment, plus a pixel."""
    pts = np.argwhere(mask).astype(float) * sp2
    if len(pts) < 3:
        return float(max(sp2))
    lam = np.linalg.eigvalsh(np.cov((pts - pts.mean(0)).T))
    return 4.0 * float(np.sqrt(max(float(lam[0]), 0.0))) + float(max(sp2))


def _disc(radius_mm: float, sp2: np.ndarray) -> np.ndarray:
    reach = np.floor(radius_mm / sp2).astype(int)
    j, i = np.meshgrid(*(np.arange(-n, n + 1) * s for n, s in zip(reach, sp2, strict=True)), indexing="ij")
    return np.asarray(np.sqrt(j**2 + i**2) <= radius_mm)


def _split_keep(region: np.ndarray, anchor: np.ndarray, sp2: np.ndarray, min_share: float) -> np.ndarray:
    """The parts of ``region`` that belong to the lesion at ``anchor``: ``region`` is split into blobs at its necks
    (watershed of the distance to its edge: a vessel or wall touching the lesion is another blob) and a blob is kept
    when it touches ``anchor`` and at least ``min_share`` of it lies on ``anchor``."""
    region = connected_to(region, anchor)
    if region.sum() < 8:
        return region
    from skimage.morphology import h_maxima  # ~1 s to load (see _polygon); most drawings never need a split
    from skimage.segmentation import watershed  # lazy with h_maxima: only a split needs it

    dist = ndi.distance_transform_edt(region, sampling=sp2)
    # only real necks split: peaks of the distance that stand out by a pixel and a fifth of the region's depth
    h = max(float(max(sp2)), 0.2 * float(dist.max()))
    markers, _ = ndi.label(h_maxima(dist, h))
    blobs = watershed(-dist, markers, mask=region)
    keep = np.zeros(region.shape, bool)
    for m in np.unique(blobs[anchor & region]):
        if m == 0:
            continue
        blob = blobs == m
        if float((blob & anchor).sum()) >= min_share * float(blob.sum()):
            keep |= blob
    return keep


def lesion_from_drawing(
    image: Volume, drawing: Drawing, engine: object | None = None, cfg: DrawingConfig | None = None
) -> tuple[Volume | None, list[str]]:
    """The 3-D lesion ``drawing`` marks on ``image`` (step 4: the seed refined by ``engine`` as a mask prompt), and
    notes saying how it was derived. None when the image gives no seed (the caller falls back and says so)."""
    seed = seed_from_drawing(image, drawing, cfg)
    if seed is None or not seed.mask.array.any():
        return None, [f"no lesion-like region at the {drawing.kind.value} ({drawing.what or 'drawing'})"]
    notes = [
        f"3-D lesion derived from a {drawing.kind.value} on one image: {seed.slices} slice(s) from the image "
        f"(lesion {seed.lesion_level:.0f} HU vs background {seed.background_level:.0f} HU)"
    ]
    segment = getattr(engine, "segment", None)
    if segment is None or drawing.kind not in (DrawingKind.ARROW, DrawingKind.POINT):
        # a diameter, an ellipse or a contour bounds the lesion better than the engine's box-free refinement does
        return seed.mask, notes
    ident = LesionIdentity("2.25.0", "seed", 1)
    refined = segment(image, Prompt(ident, PromptKind.MASK, mask=seed.mask, source="drawn seed"), None)
    r, s = refined.array > 0, seed.mask.array > 0
    if r.any() and 2 * float((r & s).sum()) / float(r.sum() + s.sum()) >= 0.5:
        return refined.with_array(r.astype(np.uint8)), [*notes, f"refined by {getattr(engine, 'name', 'engine')}"]
    return seed.mask, [*notes, "engine refinement disagreed with the seed; the seed is kept"]


def measurement_error(mask: Volume, drawing: Drawing) -> float:
    """How far ``mask`` is from reproducing the radiologist's own measurement on the drawn slice: the largest relative
    difference between its cross-section's longest diameter and the drawn long axis (and, for a bidirectional pair or
    an ellipse, its width across that axis and the short axis). Infinite for an empty cross-section; 0 for a drawing
    without diameters (an arrow, a point)."""
    long_mm, short_mm = drawing.diameters_mm()
    if long_mm <= 0:
        return 0.0
    sp = mask.spacing[::-1].astype(float)
    k0 = int(np.rint(mask.patient_to_index(drawing.all_points)[:, 2].mean()))
    if not 0 <= k0 < mask.shape[0]:
        return float("inf")
    cross = mask.array[k0] > 0
    if not cross.any():
        return float("inf")
    err = abs(_feret_mm(cross, sp[1:]) - long_mm) / long_mm
    if short_mm and drawing.kind in (DrawingKind.BIDIRECTIONAL, DrawingKind.ELLIPSE):
        axis = drawing.parts[0]
        a, b = (mask.patient_to_index(axis[:2])[:, [1, 0]] * sp[1:]) if len(axis) >= 2 else (None, None)
        if a is not None and b is not None and np.linalg.norm(b - a) > 0:
            u = (b - a) / np.linalg.norm(b - a)
            n = np.array([-u[1], u[0]])
            across = (np.argwhere(cross).astype(float) * sp[1:]) @ n
            width = float(across.max() - across.min()) + float(max(sp[1:]))
            err = max(err, abs(width - short_mm) / short_mm)
    return float(err)


def confined_to_drawn_slice(mask: Volume, drawing: Drawing) -> bool:
    """Whether ``mask``'s lesion at the drawing — its parts that touch the drawn slice — lies on the drawn slice only
    although the drawn long axis spans at least 1.5 slice spacings: a lesion that long reaches the neighbouring slice
    (a sphere of that diameter does in most positions, and a voxel is lesion when half of it is), so such a
    segmentation is the lesion flattened to one slice (issue 31: a small lesion on 5 mm slices is not). False for a
    drawing without diameters or an empty cross-section."""
    long_mm, _ = drawing.diameters_mm()
    k0 = int(np.rint(mask.patient_to_index(drawing.all_points)[:, 2].mean()))
    if long_mm < 1.5 * float(mask.spacing[2]) or not 0 <= k0 < mask.shape[0] or not (mask.array[k0] > 0).any():
        return False
    full = mask.array > 0
    lo, hi = bbox(full)  # every component lies in the mask's bounding box: label that only
    lab, _n = ndi.label(full[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
    k = k0 - int(lo[0])
    touching = np.unique(lab[k][lab[k] > 0])
    return not bool(np.delete(np.isin(lab, touching).any(axis=(1, 2)), k).any())
