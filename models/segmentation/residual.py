"""Residual lesion at a propagated site: tells "gone" from "still there, too small to segment".

A segmentation engine returns nothing (or a sub-threshold remnant it drops) both where a lesion disappeared and where
it shrank to a few voxels (a 2 × 2 × 5 mm focus on 5 mm slices). Reporting the second as vanished is a clinical
error (a RECIST complete response claimed for a lesion that is there), so the tracking loop asks this module, after
an empty result, whether the follow-up still holds lesion-like tissue where the lesion was propagated to.

The test compares like with like:

* **levels** from the prior (the reference): the lesion's own level (median of the prior lesion) and the background's
  (the most frequent level of the ring around it; of its aerated lung for a lesion in the lung, which is what the
  site holds once the lesion has gone); the contrast must stand out from the noise, else no judgement;
* **lesion-like** on the follow-up: a voxel at least half-way from the background to the lesion level (a voxel that
  is at least half lesion);
* **explained**: what was lesion-like *around* the prior lesion (vessels, chest wall, mediastinum: lung vessels are
  as bright as a nodule) is mapped onto the follow-up by the caller (the registration's label warp,
  :func:`surroundings`, label ``AROUND``); lesion-like follow-up voxels there are that structure, not the lesion; what
  was lesion-like *inside* the prior outline comes along (label ``WAS_LESION``) to tell where the lesion regressed;
* **a focus**: the unexplained lesion-like voxels within ``search_mm`` of the propagated outline, as connected
  components; one counts when it has at least ``min_voxels`` voxels, its peak reaches ``peak_fraction`` of the way to
  the lesion level, it is at least ``min_width_mm`` and 2 voxels wide in-plane (compact: not a sliver along the
  outline nor a strand through the slices), at least half of it lies inside the propagated outline (where the lesion
  was), and, when it touches two or more explained structures, it is at least ``bridge_width_mm`` wide in-plane (a
  vessel running through the site of a vanished nodule touches the vessel on both sides: a thin bridge, not a focus;
  a lesion's body between a vessel and the chest wall is wider), and it lies where the lesion regressed: of what was
  lesion-like inside the prior outline next to it, at least ``regressed_ratio`` of the share gone to background over
  the whole outline is gone there too (a prior derived from a drawing can take in a stretch of vessel or chest wall
  beside the lesion; once the lesion has gone that stretch is there unchanged inside the propagated outline — a
  structure the prior took in, not the lesion's remains; a lesion that did not regress passes); of those, the one
  most inside the outline is the focus;
* **above the base rate**: the same unexplained lesion-like fraction in the ring beyond the search band (what
  registration error and new structures produce by chance) must be clearly lower than inside the search band.

No reference, a low-contrast lesion or no such focus: None (the lesion stays vanished). Nothing here decides what to
report: the caller keeps the focus as a present lesion, measured like any other (RECIST decides whether it is too
small to measure), and flags it for review.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.base import SegReference

_FULL = np.ones((3, 3, 3), bool)
_AERATED_HU = -500.0
AROUND = 1
""":func:`surroundings` label: lesion-like around the prior lesion (a vessel, the chest wall)."""
WAS_LESION = 2
""":func:`surroundings` label: lesion-like inside the prior lesion's outline."""


@dataclass(frozen=True)
class ResidualRules:
    search_mm: float = 3.0
    """How far beyond the propagated outline a residual focus may lie (propagation / registration error)."""
    ring_mm: float = 6.0
    """Width of the prior's background ring (levels) and of the follow-up's base-rate ring beyond the search band."""
    min_contrast_sds: float = 6.0
    """The lesion must differ from its background by this many noise SDs, else there is no judgement (None)."""
    min_contrast_hu: float = 60.0
    lung_ring_fraction: float = 0.3
    """A lesion whose prior ring is at least this fraction aerated lung (< -500 HU) is judged against the lung: the
    tissue its site holds once it has gone (a juxtapleural nodule's ring also holds the chest wall)."""
    min_voxels: int = 2
    min_width_mm: float = 3.0
    """The focus must hold, on some slice, an in-plane square this wide and at least 2 × 2 voxels (a compact focus,
    not a sliver along the propagated outline such as a prior's blurred edge, nor a one-voxel-wide strand or vessel
    running through the slices)."""
    bridge_width_mm: float = 6.0
    """A focus touching two or more structures that were there around the prior (a vessel running through the site
    of a gone nodule) counts only when it holds an in-plane square this wide: a lesion's body, not a vessel's width."""
    regressed_ratio: float = 0.5
    """Where the lesion regressed, its remains are where it regressed: of what was lesion-like inside the prior outline
    next to the focus, the fraction gone to background must reach this multiple of that fraction over the whole
    outline (a stretch of vessel or chest wall that a drawn prior took in beside the lesion is unchanged beside the
    focus while the lesion has gone; a lesion that did not regress, e.g. an engine's miss, passes)."""
    peak_fraction: float = 0.75
    """The focus's most lesion-like voxel must reach this fraction of the way from the background to the lesion."""
    inside_fraction: float = 0.5
    """At least this fraction of the focus lies inside the propagated outline."""
    base_rate_factor: float = 3.0
    """The unexplained lesion-like fraction of the search band must exceed this multiple of the ring's."""


@dataclass(frozen=True)
class ResidualFocus:
    """A residual lesion-like focus at the propagated site (mask on the follow-up grid)."""

    mask: Volume
    voxels: int
    volume_mm3: float
    peak_fraction: float  # of the way from the background to the lesion level
    reason: str


@dataclass(frozen=True)
class PriorLevels:
    """A prior lesion's level, its background's and the noise (HU), from :func:`prior_levels`."""

    lesion: float
    background: float
    noise: float

    @property
    def contrast(self) -> float:
        return self.lesion - self.background

    def fraction(self, values: np.ndarray) -> np.ndarray:
        """How far each value lies from the background towards the lesion level (0 background, 1 lesion)."""
        return np.asarray((values - self.background) / self.contrast, dtype=np.float64)


def surroundings(
    reference: SegReference, rules: ResidualRules | None = None, levels: PriorLevels | None = None
) -> Volume | None:
    """What was lesion-like around the prior lesion (``AROUND``) and inside it (``WAS_LESION``), on the prior grid
    (uint8), for the caller to warp onto the follow-up with a label warp; None when the prior lesion gives no clear
    levels (then :func:`residual_focus` judges nothing). ``levels``: :func:`prior_levels` when the caller has them."""
    r = rules or ResidualRules()
    levels = levels if levels is not None else prior_levels(reference, r)
    if levels is None:
        return None
    sl = _box(reference.mask.array > 0, reference.mask.spacing[::-1], r.search_mm + 2 * r.ring_mm + 4.0)
    lesion = reference.mask.array[sl] > 0
    like = levels.fraction(reference.image.array[sl].astype(np.float64)) >= 0.5
    out = np.zeros(reference.mask.shape, np.uint8)
    out[sl][like & ~lesion] = AROUND
    out[sl][like & lesion] = WAS_LESION
    return reference.mask.with_array(out)


def residual_focus(
    image: Volume,
    propagated: Volume,
    reference: SegReference,
    explained: Volume | None,
    rules: ResidualRules | None = None,
    levels: PriorLevels | None = None,
) -> ResidualFocus | None:
    """The residual focus of the lesion at ``propagated`` (the prior mask warped onto ``image``'s grid) on ``image``;
    ``explained``: :func:`surroundings` warped onto the same grid (None: nothing in or around the prior was
    lesion-like); ``levels``: :func:`prior_levels` when the caller has them."""
    r = rules or ResidualRules()
    levels = levels if levels is not None else prior_levels(reference, r)
    prompt_full = propagated.array > 0
    if levels is None or not prompt_full.any():
        return None
    sp = image.spacing[::-1]
    sl = _box(prompt_full, sp, r.search_mm + r.ring_mm + 2.0)
    prompt = prompt_full[sl]
    frac = levels.fraction(image.array[sl].astype(np.float64))
    prior_map = np.zeros(prompt.shape, np.uint8) if explained is None else explained.array[sl]
    known, was = prior_map == AROUND, prior_map == WAS_LESION
    unexplained = (frac >= 0.5) & ~known
    dist = ndi.distance_transform_edt(~prompt, sampling=sp)
    band = dist <= r.search_mm
    ring = (dist > r.search_mm) & (dist <= r.search_mm + r.ring_mm)
    base = float(unexplained[ring].mean()) if ring.any() else 0.0
    inside = float(unexplained[band].mean())
    if inside <= r.base_rate_factor * base:
        return None
    focus = _best_focus(unexplained & band, prompt, known, was, frac, sp, r)
    if focus is None:
        return None
    out = np.zeros(image.shape, np.uint8)
    out[sl] = focus
    n = int(focus.sum())
    peak = float(frac[focus].max())
    reason = (
        f"residual focus of {n} voxels ({n * image.voxel_volume_mm3():.0f} mm³) at the propagated site, "
        f"peak {peak:.0%} of the lesion's contrast to its background; lesion-like fraction {inside:.0%} there "
        f"against {base:.0%} around it"
    )
    return ResidualFocus(image.with_array(out), n, n * image.voxel_volume_mm3(), peak, reason)


def _best_focus(
    candidates: np.ndarray,
    prompt: np.ndarray,
    known: np.ndarray,
    was: np.ndarray,
    frac: np.ndarray,
    sp: np.ndarray,
    r: ResidualRules,
) -> np.ndarray | None:
    """The qualifying component of ``candidates`` with most voxels inside the prompt (see the module docstring)."""
    lab, n = ndi.label(candidates, structure=_FULL)
    if n == 0:
        return None
    known_lab, _ = ndi.label(known, structure=_FULL)
    overall = float((frac[was] < 0.5).mean()) if was.any() else 0.0  # how far the lesion as a whole regressed
    square, wide = _square(r.min_width_mm, sp), _square(r.bridge_width_mm, sp)
    best, best_in = None, 0
    for i in range(1, n + 1):
        comp = lab == i
        size = int(comp.sum())
        n_in = int((comp & prompt).sum())
        if size < r.min_voxels or n_in < r.inside_fraction * size or float(frac[comp].max()) < r.peak_fraction:
            continue
        if not ndi.binary_erosion(comp, structure=square).any():  # no in-plane square fits: a sliver or a strand
            continue
        touching = np.unique(known_lab[ndi.binary_dilation(comp, structure=_FULL) & known])
        if touching.size > 1 and not ndi.binary_erosion(comp, structure=wide).any():
            continue  # a thin bridge between two structures that were there around the prior: a vessel, not a focus
        if _regressed(comp, was, frac, sp, r) < r.regressed_ratio * overall:
            continue  # unchanged beside it while the lesion regressed elsewhere: a structure the prior took in
        if n_in > best_in:
            best, best_in = comp, n_in
    return best


def _regressed(comp: np.ndarray, was: np.ndarray, frac: np.ndarray, sp: np.ndarray, r: ResidualRules) -> float:
    """Of what was lesion-like inside the prior outline next to ``comp`` (within ``ring_mm`` in-plane, on its slices),
    the fraction that is background-like now (below half-way to the lesion level); 0 where nothing was."""
    near = np.zeros_like(comp)
    for k in np.flatnonzero(comp.any(axis=(1, 2))):
        near[k] = ndi.distance_transform_edt(~comp[k], sampling=sp[1:]) <= r.ring_mm
    there = was & near
    return float((frac[there] < 0.5).mean()) if there.any() else 0.0


def prior_levels(reference: SegReference, rules: ResidualRules | None = None) -> PriorLevels | None:
    """The lesion's level, its background's and the noise, from the prior CT; None at too low a contrast (computed
    once by a caller that calls both :func:`surroundings` and :func:`residual_focus`)."""
    r = rules or ResidualRules()
    m_full = reference.mask.array > 0
    if not m_full.any():
        return None
    sp = reference.image.spacing[::-1]
    sl = _box(m_full, sp, r.ring_mm + 2.0)
    m = m_full[sl]
    img = reference.image.array[sl].astype(np.float64)
    outside = ndi.distance_transform_edt(~m, sampling=sp)
    ring = img[(outside > 1.0) & (outside <= 1.0 + r.ring_mm)]
    if ring.size < 10:
        return None
    lesion = float(np.median(img[m]))
    lung = ring < _AERATED_HU
    # a lesion in the lung leaves aerated lung when it resolves, whatever else its ring holds (chest wall, vessels)
    in_lung = lesion > _AERATED_HU and float(lung.mean()) >= r.lung_ring_fraction
    background = _mode(ring[lung] if in_lung else ring)
    close = ring[np.abs(ring - background) <= 100.0]
    noise = max(1.4826 * float(np.median(np.abs(close - np.median(close)))), 1.0)
    contrast = abs(lesion - background)
    if contrast < max(r.min_contrast_hu, r.min_contrast_sds * noise):
        return None
    return PriorLevels(lesion, background, noise)


def _square(width_mm: float, sp: np.ndarray) -> np.ndarray:
    """An in-plane square (one slice thick) at least ``width_mm`` and 2 voxels wide (``sp`` = k, j, i spacing)."""
    n = np.maximum(2, np.ceil(width_mm / sp[1:] - 1e-6)).astype(int)
    return np.ones((1, int(n[0]), int(n[1])), bool)


def _mode(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=np.arange(-1100.0, 3120.0, 20.0))
    return float(edges[int(np.argmax(ndi.gaussian_filter1d(hist.astype(np.float64), 1.0)))] + 10.0)


def _box(mask: np.ndarray, sp: np.ndarray, pad_mm: float) -> tuple[slice, slice, slice]:
    idx = np.argwhere(mask)
    pad = np.ceil(pad_mm / sp).astype(int)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, np.array(mask.shape))
    return (slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1])), slice(int(lo[2]), int(hi[2])))
