"""The default, weight-free segmentation engine: adapts a learned intensity model to the follow-up CT.

How it segments one lesion (all inside an ROI around the prompt, physical units throughout):

1. Rasterise the prompt on the follow-up grid (a warped prior mask, a box or point balls).
2. Intensity model. Lesion: kernel density of the (smoothed) prior CT inside the prior mask less its outermost
   (partial-volume) voxel layer when a :class:`SegReference` is given, re-centred by half the difference between
   the follow-up's prompt core and the prior lesion's own core (contrast phase changes; core against core, so a
   part-solid nodule's solid centre is not read as a shift of its ground-glass rim); otherwise the follow-up inside
   the prompt core. Background: the ring around the prior lesion (or
   around the prompt / a region grown from the point).
3. Per-voxel evidence = log-likelihood ratio lesion/background + a spatial shape prior from the signed distance to
   the propagated prompt (its scale grows with lesion size, so a lesion may grow to ~2× its diameter or shrink),
   with a hard limit on growth — this keeps lesions touching similar-density structures from leaking. For a mask
   prompt the prior is centred on a fitted outline: the one uniform growth/shrink offset of the prompt (a level of
   its signed distance) that maximises the summed evidence inside it; the boundary may leave that level outwards
   only within a narrow band, so growth along the lesion's own outline is followed while a leak along an adjacent
   vessel or into the chest wall is cut off. Tissue beyond the lesion's own intensities, on the side away from the
   background (fat beyond the liver around a hypodense lesion), is no evidence of the lesion in that fit.
4. Confident voxels (and lesion-leaning voxels inside the fitted outline) become seeds of a random walker
   (skimage) run on the lesion-probability image, which places the boundary.
5. The voxel layers either side of that boundary are re-decided at the half-way level between the local lesion
   intensity and the background (partial-volume correct: a voxel is lesion when at least half of it is; skipped at
   low contrast and where the lesion abuts a structure of its own density). For a mask prompt of a lesion that
   stands out from its background (>= 100 HU), what lies outside the fitted outline is kept only where a 2 mm ball
   fits (a morphological opening): a vessel or strand touching the lesion is a thin protrusion, growth is not. Holes
   are filled and the component nearest the prompt's centre is kept. Growth beyond a mask prompt (past its
   partial-volume layer) whose neighbourhood does not look like the lesion is dropped: a low-contrast lesion's random
   walk can spread into its organ, and a prior of volume V must not yield many times V without a boundary there.
6. No lesion-like evidence inside the prompt core (searched within a few mm, for propagation error), or a result
   below ``min_volume_mm3`` (or, for a mask prompt, below ``min_prompt_fraction`` of the prompt: a remnant of a few
   lesion-like voxels at the site of a vanished lesion) → empty mask (vanished).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import random_walker

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.base import SegReference
from lesiontrack.models.segmentation.components import keep_nearest_component, mask_centre_index
from lesiontrack.models.segmentation.levels import dominant_level
from lesiontrack.models.segmentation.prompts import Prompt, PromptKind
from lesiontrack.models.segmentation.rasterize import prompt_to_mask

_BINS = np.arange(-1200.0, 3200.0, 2.0)


@dataclass(frozen=True)
class AdaptiveConfig:
    point_radius_mm: float = 5.0  # ball painted around each click
    smoothing_mm: float = 0.8  # Gaussian denoising before modelling
    ring_mm: float = 6.0  # width of the background ring around the prior lesion
    growth_factor: float = 1.0  # allowed growth beyond the prompt, in equivalent radii (1.0 = 2x diameter)
    min_growth_mm: float = 6.0
    max_growth_mm: float = 30.0
    prior_scale_mm: float = 3.0  # minimum spatial prior scale (logit 1 per scale outside/inside the prompt)
    prior_clip: float = 4.0
    seed_logit: float = 1.5  # |evidence| above which a voxel seeds the random walker
    min_sd_hu: float = 8.0  # floor of the kernel bandwidth
    rw_beta: float = 60.0
    min_volume_mm3: float = 10.0
    min_prompt_fraction: float = 0.05
    """A result below this fraction of the prompt's volume is a remnant, not the lesion: vanished (a lesion that
    shrank to x0.3 keeps 30 %; a few lesion-like voxels left at the site of a vanished lesion are noise)."""
    fit_linear_cnr: float = 1.5
    """Below this lesion-to-background contrast (in noise SDs) the outline fit weighs intensities with the
    equal-variance Gaussian likelihood ratio instead of the kernel models' (:func:`_fit_evidence`)."""
    recentre_max_fraction: float = 0.25
    """Mask prompts with a reference: the lesion model's re-centring on the follow-up moves it by at most this
    fraction of the lesion's contrast to its background (median lesion − median ring on the prior CT)."""
    presence_fraction: float = 0.15  # of the prompt core that must look like lesion, else vanished
    presence_cap: float = 0.4  # upper bound of that fraction when the surroundings look lesion-like
    max_roi_voxels: int = 400_000  # larger ROIs are segmented on a coarser grid
    presence_search_mm: float = 3.0
    """The presence test looks for the lesion-like core within this distance of the propagated core (the best
    placement counts): tolerance for propagation / registration error, which can exceed a small lesion's core."""
    fit_offset: bool = True
    """Mask prompts: fit one uniform growth/shrink offset (mm, a level of the prompt's signed distance) to the
    intensity evidence and centre the shape prior on it, so that growth, shrinkage and leaks are told apart: a lesion
    grows or shrinks roughly along its own outline, a leak into an adjacent vessel or wall is a local protrusion."""
    fit_clip: float = 2.0
    """|log-likelihood ratio| cap per voxel in the offset fit (a few extreme voxels must not decide the size)."""
    fit_switch_cost: float = 0.5
    """Logit cost per voxel moved across the prompt's outline by the offset fit: a shell is added or removed only
    when its mean evidence clearly says so (partial-volume boundary voxels are ambiguous, not evidence of change)."""
    fit_range_sds: float = 3.0
    """Low-contrast outline fit: intensities more than this many SDs (the lesion's spread, at least the noise) beyond
    the lesion's level, on the side away from the background, are another tissue, not strong lesion evidence."""
    fit_step_mm: float = 0.5
    """Resolution of the offset search."""
    band_mm: float = 3.0
    """After the offset fit, the boundary may deviate locally from the fitted level by at most
    ``max(band_mm, band_fraction * r_eq)`` outwards."""
    band_fraction: float = 0.35
    """See ``band_mm``; scales the band with lesion size (larger lesions grow less uniformly)."""
    halfway: bool = True
    """Re-decide the voxel layers either side of the boundary at the half-way level between the lesion's and the
    background's intensity (the partial-volume-correct boundary: a voxel is lesion when at least half of it is).
    Without it the boundary sits where the likelihood ratio changes sign, which for a small lesion, whose model holds
    its own blurred edge, lies 35–50 % of the way from the background: a shell of +10…+30 % volume."""
    halfway_radius_mm: float = 3.0
    """Scale (Gaussian sigma) of the local lesion level next to each boundary voxel."""
    halfway_pv_mm: float = 1.0
    """Partial-volume reach beyond the outermost voxel layer: lesion levels come from voxels deeper than one voxel
    plus this, background levels from voxels farther out than that."""
    halfway_layer_mm: float = 2.0
    """The local lesion level is taken from the layer just inside the edge (this deep), not from the lesion's centre
    (a part-solid nodule's rim is judged against its ground glass, not its solid core)."""
    halfway_min_contrast: float = 4.0
    """Re-decide only where lesion and background differ by this many noise standard deviations."""
    halfway_iterations: int = 2
    straddle_fraction: float = 0.1
    """A lesion with at least this fraction of its tissue brighter than the background by 2 noise SDs *and* this
    fraction darker (a necrotic lesion's enhancing rim around its fluid centre) has no one half-way level: the
    half-way step is skipped and the random walker's boundary stands."""
    growth_min_fraction: float = 0.4
    """Mask prompts: the segment's growth beyond the prior mask's partial-volume layer is kept only when its median
    (neighbourhood) intensity lies at least this fraction of the way from the background to the lesion
    (:func:`_supported_growth`): growth of the lesion is lesion tissue with its blurred edge (about half-way and
    above); a spread into the organ around a low-contrast lesion is the organ (near zero)."""
    growth_min_voxels: int = 10
    """Growth of fewer voxels than this is left to the boundary steps (its mean says too little)."""
    trim_protrusions: bool = True
    """Mask prompts: outside the fitted outline keep only what a ball of ``trim_radius_mm`` fits into (a morphological
    opening): a vessel or a blurred strand touching the lesion is a thin protrusion, growth along the outline is not."""
    trim_radius_mm: float = 2.0
    trim_min_contrast_hu: float = 100.0
    """Trim only a lesion that differs from its background by this much (a lung nodule, a node in fat): a
    low-contrast lesion's edge beyond the fitted outline is ragged with noise, and is as likely growth as anything."""
    trim_tolerance: float = 0.5
    """Voxels within this fraction of a voxel beyond the fitted outline count as inside it (the outline is a level of a
    voxelised distance: a lesion's own boundary layer must not be trimmed as a protrusion)."""


class AdaptiveEngine:
    """Prompt-driven 3-D segmentation without learned weights (see module docstring)."""

    name = "adaptive"
    version = "1.0"

    def __init__(self, config: AdaptiveConfig | None = None, **overrides: Any) -> None:
        self.config = replace(config or AdaptiveConfig(), **overrides)

    # ------------------------------------------------------------------------------------------------
    def segment(self, image: Volume, prompt: Prompt, reference: SegReference | None = None) -> Volume:
        cfg = self.config
        pmask_full = prompt_to_mask(prompt, image, point_radius_mm=cfg.point_radius_mm)
        out = np.zeros(image.shape, np.uint8)
        if not pmask_full.array.any():
            return _like(image, out)
        r_eq = _equivalent_radius_mm(pmask_full)
        is_mask = prompt.kind is PromptKind.MASK
        if is_mask:
            growth = float(np.clip(cfg.growth_factor * r_eq, cfg.min_growth_mm, cfg.max_growth_mm))
        elif prompt.kind is PromptKind.BOX:
            growth = 2.0
        else:
            growth = cfg.max_growth_mm
        margin = growth + cfg.ring_mm + 4.0
        sl = _roi_slices(pmask_full, margin)
        roi_img = _crop(image, sl)
        roi_prompt = _crop(pmask_full, sl).array > 0
        work_img, work_prompt, down = _maybe_coarsen(roi_img, roi_prompt, cfg.max_roi_voxels)
        result = self._segment_roi(work_img, work_prompt, prompt, reference, r_eq, growth)
        if result is None:
            return _like(image, out)
        if down is not None:
            result = _like(work_img, result.astype(np.float32)).resample_to(roi_img).array > 0.5
        out[sl] = result
        res = _like(image, out)
        centre = _prompt_centre_mm(pmask_full)
        res = keep_nearest_component(res, centre, max_distance_mm=max(10.0, r_eq))
        vol = res.array.sum() * image.voxel_volume_mm3()
        prompt_vol = float(pmask_full.array.sum()) * image.voxel_volume_mm3()
        if vol < cfg.min_volume_mm3 or (is_mask and vol < cfg.min_prompt_fraction * prompt_vol):
            return _like(image, np.zeros(image.shape, np.uint8))
        return res

    # ------------------------------------------------------------------------------------------------
    def _segment_roi(
        self, img: Volume, pmask: np.ndarray, prompt: Prompt, reference: SegReference | None, r_eq: float, growth: float
    ) -> np.ndarray | None:
        cfg = self.config
        sp = img.spacing[::-1]  # (k, j, i) mm
        smooth = ndi.gaussian_filter(img.array.astype(np.float32), sigma=cfg.smoothing_mm / sp)
        inside_d = ndi.distance_transform_edt(pmask, sampling=sp)
        outside_d = ndi.distance_transform_edt(~pmask, sampling=sp)
        sdist = _signed_distance(pmask, inside_d, outside_d, sp)  # mm, > 0 outside the prompt

        core = _core(pmask, inside_d)
        if prompt.kind is PromptKind.POINTS:
            core = pmask & (inside_d >= min(2.0, inside_d.max()))
        # --- intensity models ---------------------------------------------------------------------
        shape = _PromptShape(pmask, inside_d, sdist, r_eq, growth)
        les_s, bg_s, les_pdf, shape = _intensity_samples(prompt.kind, smooth, core, shape, sp, reference, cfg)
        pmask, inside_d, sdist, r_eq, growth = shape.mask, shape.inside_d, shape.sdist, shape.r_eq, shape.growth
        bg_pdf = _kde(bg_s, cfg.min_sd_hu)
        les_mode = float(_BINS[int(np.argmax(les_pdf))])  # the lesion model's most frequent intensity
        llr = np.clip(np.log(_lookup(les_pdf, smooth)) - np.log(_lookup(bg_pdf, smooth)), -6.0, 6.0)

        if not _present(llr, (les_pdf, bg_pdf), bg_s, core, sp, cfg):
            return None

        # --- spatial shape prior -----------------------------------------------------------------
        forbidden = sdist > growth
        offset, fitted = 0.0, False
        if prompt.kind is PromptKind.BOX:
            prior = np.where(pmask, 0.5, -cfg.prior_clip)
        else:
            scale = max(cfg.prior_scale_mm, 0.5 * r_eq)
            if prompt.kind is PromptKind.MASK and cfg.fit_offset:
                fitted = True
                # moving the voxels next to the prompt's outline (partial-volume layer) across it costs
                # ``fit_switch_cost`` each: an ambiguous boundary layer stays where the prompt put it
                pv_layer = np.abs(sdist) <= float(np.min(sp))
                ev, peak = _fit_evidence(llr, smooth, les_mode, les_s, bg_s, cfg)
                switch = cfg.fit_switch_cost * min(peak, cfg.fit_clip) / cfg.fit_clip
                fit_ev = np.clip(ev, -cfg.fit_clip, cfg.fit_clip) - switch * np.sign(sdist) * pv_layer
                offset = _fit_offset(fit_ev, sdist, -float(inside_d.max()), growth, cfg)
                forbidden |= sdist > offset + max(cfg.band_mm, cfg.band_fraction * r_eq)
            prior = np.clip(-(sdist - offset) / scale, -cfg.prior_clip, cfg.prior_clip)
        evidence = llr + prior
        fg = (evidence > cfg.seed_logit) & ~forbidden & (llr > 0)
        if fitted:
            # voxels inside the fitted outline that lean towards the lesion model seed the lesion
            fg |= (sdist <= offset - 0.5 * float(np.min(sp))) & (llr > 0)
        bg = (evidence < -cfg.seed_logit) | forbidden
        labels = _seed_labels(fg, bg, pmask, core)
        if labels is None:
            return None
        seg = _random_walk(llr, labels, cfg, sp) & ~forbidden
        # the half-way step's contrast test compares with the image noise (a ground-glass nodule, 300 HU above the
        # lung, was left to the kernel ratio because its lung ring with vessels spreads ±90 HU: its growth was missed)
        noise = _noise_sd(les_s, bg_s)
        if cfg.halfway and not _straddles(les_s, bg_s, noise, cfg.straddle_fraction):
            seg = _halfway(seg, smooth, forbidden, (noise, les_mode), sp, cfg)
        distinct = bg_s.size > 0 and abs(les_mode - float(np.median(bg_s))) >= cfg.trim_min_contrast_hu
        if cfg.trim_protrusions and prompt.kind is PromptKind.MASK and distinct:
            outline = sdist <= (offset if fitted else 0.0) + cfg.trim_tolerance * float(np.min(sp))
            seg = (seg & outline) | ndi.binary_opening(seg, structure=_ball(cfg.trim_radius_mm, sp))
        if prompt.kind is PromptKind.MASK:
            levels = (les_mode, dominant_level(bg_s) if bg_s.size else les_mode, max(_robust_sd(les_s), noise))
            seg = _supported_growth(seg, smooth, sdist, levels, float(np.min(sp)), cfg)
        seg = ndi.binary_fill_holes(seg)
        return seg


def _supported_growth(
    seg: np.ndarray,
    smooth: np.ndarray,
    sdist: np.ndarray,
    levels: tuple[float, float, float],
    layer_mm: float,
    cfg: AdaptiveConfig,
) -> np.ndarray:
    """``seg`` less its growth beyond a mask prompt when that growth does not look like the lesion.

    The part of the segment more than ``layer_mm`` (one voxel: its partial-volume layer) outside the propagated prior
    mask is growth; taken together (its own blurred edge included), the median of its voxels' neighbourhood
    intensities must lie at least ``growth_min_fraction`` of the way from the background to the lesion (``levels`` =
    lesion, background, the
    lesion's spread; tissue beyond the lesion's intensities, away from the background, counts as none). Otherwise
    the evidence held no boundary there — a low-contrast lesion whose random walk spread into its organ — and the
    segment is cut back to the prior mask and that layer: a prior of volume V does not yield many times V without it.
    """
    grown = seg & (sdist > layer_mm)
    lesion, background, spread = levels
    if grown.sum() < cfg.growth_min_voxels or abs(lesion - background) < 1e-6:
        return seg
    # each voxel judged by its neighbourhood (one voxel's Gaussian): the random walk picked the voxels that noise made
    # lesion-like, whose own values are biased towards the lesion
    around = ndi.gaussian_filter(smooth, sigma=1.0)[grown]
    fraction = (around - background) / (lesion - background)
    other = np.sign(lesion - background) * (around - lesion) > cfg.fit_range_sds * spread  # fat beyond the liver
    fraction = np.where(other, 0.0, np.clip(fraction, 0.0, 1.0))
    return seg if float(np.median(fraction)) >= cfg.growth_min_fraction else seg & ~grown


@dataclass(frozen=True)
class _PromptShape:
    """The prompt on the ROI: its mask, distances inside it and signed distance to it (mm, > 0 outside), its
    equivalent radius and how far the lesion may grow beyond it (mm)."""

    mask: np.ndarray
    inside_d: np.ndarray
    sdist: np.ndarray
    r_eq: float
    growth: float


def _intensity_samples(
    kind: PromptKind,
    smooth: np.ndarray,
    core: np.ndarray,
    shape: _PromptShape,
    sp: np.ndarray,
    reference: SegReference | None,
    cfg: AdaptiveConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, _PromptShape]:
    """Lesion and background intensity samples and the lesion's intensity model: from the prior's segmentation
    (``reference``) where there is one, else from the prompt; a click's prompt is regrown first (its extent is
    unknown), hence the prompt shape returned."""
    if reference is not None and reference.mask.array.any():
        les_s, bg_s, les_pdf = _reference_model(reference, smooth[core], cfg)
    else:
        les_s = smooth[core]
        if kind is PromptKind.POINTS:
            pmask, inside_d, sdist, r_eq = _regrown_prompt(smooth, core, les_s, sp, cfg, shape.r_eq)
            shape = _PromptShape(pmask, inside_d, sdist, r_eq, max(cfg.min_growth_mm, r_eq))
        elif kind is PromptKind.BOX:
            les_s = smooth[_inner_box(shape.mask)]
        les_pdf = _kde(les_s, cfg.min_sd_hu)
        gap = 1.0 if kind is not PromptKind.POINTS else 2.0 + 0.5 * shape.r_eq  # extent unknown for clicks
        ring = (shape.sdist > gap) & (shape.sdist <= gap + cfg.ring_mm)
        bg_s = smooth[ring]
        if kind is PromptKind.POINTS:  # lesion extent unknown: lesion-like ring voxels are not background
            med = float(np.median(les_s))
            far = np.abs(bg_s - med) > _grow_tolerance(les_s, cfg)
            if far.sum() >= 20:
                bg_s = bg_s[far]
    if bg_s.size < 5:
        bg_s = smooth[shape.sdist > shape.growth]
    return les_s, bg_s, les_pdf, shape


# ----------------------------------------------------------------------------------------------------
def _reference_model(
    reference: SegReference, fu_core: np.ndarray, cfg: AdaptiveConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lesion and background samples of the prior (reference) segmentation and the lesion's intensity model,
    re-centred on the follow-up core (``fu_core``: its smoothed intensities) where they are compatible."""
    les_s, bg_s, ref_deep = _reference_samples(reference, cfg)
    les_pdf = _kde(les_s, cfg.min_sd_hu)
    # adapt: follow-up core voxels compatible with the prior lesion model re-centre it. Like is compared
    # with like: the follow-up's deep core (the deep half of the propagated prompt) against the prior
    # lesion's own deep half — a part-solid nodule's solid centre is not its ground-glass rim, and taking
    # the difference between them for a contrast-phase shift would move the whole model off the rim.
    lo, hi = np.percentile(les_s, [2, 98])
    pad = max(2 * cfg.min_sd_hu, 0.25 * (hi - lo))
    ok = fu_core[(fu_core >= lo - pad) & (fu_core <= hi + pad)]
    # (a lesion of a few voxels has no deep half worth the name: its whole interior stands in)
    ref_centre = ref_deep if ref_deep.size >= 20 else les_s
    if ok.size >= 5:
        shift = float(np.median(ok) - np.median(ref_centre))
        # a shrinking lesion leaves background in the propagated core, which reads as a shift towards the
        # background: the data cannot tell it from a contrast change, so the model moves by at most a
        # fraction of the lesion's own contrast and stays on its side of the half-way level
        cap = cfg.recentre_max_fraction * abs(float(np.median(les_s)) - float(np.median(bg_s)))
        les_pdf = _kde(les_s + float(np.clip(0.5 * shift, -cap, cap)), cfg.min_sd_hu)
    return les_s, bg_s, les_pdf


def _regrown_prompt(
    smooth: np.ndarray, core: np.ndarray, les_s: np.ndarray, sp: np.ndarray, cfg: AdaptiveConfig, r_eq: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """A click's prompt, grown from its core over tissue like it: the mask, its inside distance, signed distance
    and equivalent radius (at least ``r_eq``)."""
    pmask = _grow_from_core(smooth, core, les_s, sp, cfg)
    inside_d = ndi.distance_transform_edt(pmask, sampling=sp)
    outside_d = ndi.distance_transform_edt(~pmask, sampling=sp)
    sdist = _signed_distance(pmask, inside_d, outside_d, sp)
    r_eq = max(r_eq, (3 * pmask.sum() * np.prod(sp) / (4 * np.pi)) ** (1 / 3))
    return pmask, inside_d, sdist, r_eq


def _present(
    llr: np.ndarray,
    pdfs: tuple[np.ndarray, np.ndarray],
    bg_s: np.ndarray,
    core: np.ndarray,
    sp: np.ndarray,
    cfg: AdaptiveConfig,
) -> bool:
    """Presence test: does anything inside the prompt core still look like the lesion? Background voxels that
    look lesion-like by chance (noise, low contrast) set the bar: the core must hold clearly more of them than the
    background does. ``pdfs`` = the lesion's and the background's intensity models."""
    les_pdf, bg_pdf = pdfs
    bg_llr = np.log(_lookup(les_pdf, bg_s)) - np.log(_lookup(bg_pdf, bg_s))
    false_rate = float((bg_llr > 0.5).mean()) if bg_s.size else 0.0
    need = min(max(cfg.presence_fraction, 2.0 * false_rate + 0.1), cfg.presence_cap)
    return bool(core.any()) and not _best_core_fraction(llr > 0.5, core, sp, cfg.presence_search_mm) < need


def _halfway(
    seg: np.ndarray,
    smooth: np.ndarray,
    forbidden: np.ndarray,
    levels: tuple[float, float],
    sp: np.ndarray,
    cfg: AdaptiveConfig,
) -> np.ndarray:
    """``cfg.halfway_iterations`` steps of the half-way boundary (``levels`` = image noise, lesion mode)."""
    noise, les_mode = levels
    for _ in range(cfg.halfway_iterations):
        seg = _halfway_boundary(seg, smooth, sp, cfg, noise, les_mode) & ~forbidden
    return seg


def _seed_labels(fg: np.ndarray, bg: np.ndarray, pmask: np.ndarray, core: np.ndarray) -> np.ndarray | None:
    """Random-walker labels (1 lesion, 2 background, 0 undecided): lesion seeds only where connected to the
    core, background also on the region's border outside the prompt; None when no lesion seed reaches the core."""
    border = np.zeros_like(bg)
    border[[0, -1], :, :] = border[:, [0, -1], :] = border[:, :, [0, -1]] = True
    bg |= border & ~pmask
    lab, n = ndi.label(fg)
    if n == 0:
        return None
    keep = np.unique(lab[core & fg])
    keep = keep[keep > 0]
    if keep.size == 0:
        return None
    fg = np.isin(lab, keep)
    bg &= ~fg
    labels = np.zeros(pmask.shape, np.int32)
    labels[bg] = 2
    labels[fg] = 1
    return labels


def _random_walk(llr: np.ndarray, labels: np.ndarray, cfg: AdaptiveConfig, sp: np.ndarray) -> np.ndarray:
    """The lesion mask: the seeds' labels spread over the undecided voxels by a random walker on the lesion
    probability."""
    prob = 1.0 / (1.0 + np.exp(-llr))
    if not (labels == 0).any():
        return labels == 1
    with warnings.catch_warnings():  # cg tolerance: probabilities a hair outside [0, 1] are harmless here
        warnings.simplefilter("ignore", UserWarning)
        return random_walker(prob, labels, beta=cfg.rw_beta, mode="cg_j", tol=1e-3, spacing=sp) == 1


def _like(grid: Volume, arr: np.ndarray) -> Volume:
    return Volume(arr, grid.origin.copy(), grid.spacing.copy(), grid.direction.copy())


def _equivalent_radius_mm(mask: Volume) -> float:
    vol = float((mask.array > 0).sum()) * mask.voxel_volume_mm3()
    return (3 * vol / (4 * np.pi)) ** (1 / 3)


def _prompt_centre_mm(mask: Volume) -> np.ndarray:
    kji = mask_centre_index(mask.array, mask.spacing[::-1])
    if kji is None:
        raise ValueError("the prompt mask is empty: it has no centre")
    return mask.index_to_patient(kji[::-1].astype(float))


def _roi_slices(mask: Volume, margin_mm: float) -> tuple[slice, slice, slice]:
    idx = np.argwhere(mask.array > 0)
    lo, hi = idx.min(0), idx.max(0)
    m = np.ceil(margin_mm / mask.spacing[::-1]).astype(int)
    lo = np.maximum(lo - m, 0)
    hi = np.minimum(hi + m + 1, np.array(mask.shape))
    return (slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1])), slice(int(lo[2]), int(hi[2])))


def _crop(vol: Volume, sl: tuple[slice, slice, slice]) -> Volume:
    start_ijk = np.array([sl[2].start, sl[1].start, sl[0].start], float)
    return Volume(
        np.ascontiguousarray(vol.array[sl]), vol.index_to_patient(start_ijk), vol.spacing.copy(), vol.direction.copy()
    )


def _maybe_coarsen(img: Volume, pmask: np.ndarray, max_voxels: int) -> tuple[Volume, np.ndarray, float | None]:
    n = img.array.size
    if n <= max_voxels:
        return img, pmask, None
    factor = (n / max_voxels) ** (1 / 3)
    target = float(np.min(img.spacing)) * factor
    spacing = np.maximum(img.spacing, target)
    extent = img.spacing * (np.array(img.size_ijk) - 1)
    size = np.maximum(1, np.floor(extent / spacing + 1e-6).astype(int) + 1)
    ref = Volume(np.zeros((size[2], size[1], size[0]), np.uint8), img.origin, spacing, img.direction)
    coarse = img.resample_to(ref)
    pm = _like(img, pmask.astype(np.float32)).resample_to(ref, default=0.0).array > 0.5
    return coarse, pm, target


def _core(pmask: np.ndarray, inside_d: np.ndarray) -> np.ndarray:
    """Deep part of the prompt: at least half the maximal depth (never empty for a non-empty prompt)."""
    dmax = float(inside_d.max())
    return pmask & (inside_d >= max(0.5 * dmax, min(1.0, dmax)))


def _inner_box(pmask: np.ndarray) -> np.ndarray:
    idx = np.argwhere(pmask)
    lo, hi = idx.min(0), idx.max(0)
    c, h = (lo + hi) / 2, np.maximum((hi - lo) / 4, 0.5)
    out = np.zeros_like(pmask)
    a = np.floor(c - h).astype(int)
    b = np.ceil(c + h).astype(int) + 1
    out[a[0] : b[0], a[1] : b[1], a[2] : b[2]] = True
    return out & pmask


def _reference_samples(reference: SegReference, cfg: AdaptiveConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smoothed prior-CT samples: the lesion (less its outermost voxel layer when it is deep enough), the background
    ring, and the lesion's deep half (as ``_core``)."""
    m = reference.mask.array > 0
    margin = cfg.ring_mm + 3.0
    sl = _roi_slices(reference.mask, margin)
    sp = reference.image.spacing[::-1]
    img = ndi.gaussian_filter(reference.image.array[sl].astype(np.float32), sigma=cfg.smoothing_mm / sp)
    mm = m[sl]
    inside = ndi.distance_transform_edt(mm, sampling=sp)
    outside = ndi.distance_transform_edt(~mm, sampling=sp)
    # the outermost voxel layer of the mask is partial volume with the surroundings; where the lesion is several
    # layers deep it is left out, so that the model holds lesion tissue, not the blurred edge (whose values pull
    # the boundary outwards). A lesion only a few voxels deep is partial volume throughout: all of it is sampled.
    depth = 1.5 * float(np.min(sp))
    depth = depth if depth <= 0.35 * float(inside.max()) else 1.0
    core = mm & (inside >= min(depth, 0.5 * inside.max()))
    ring = (outside > 1.0) & (outside <= 1.0 + cfg.ring_mm)
    return img[core], img[ring], img[_core(mm, inside)]


def _best_core_fraction(lesion_like: np.ndarray, core: np.ndarray, sp: np.ndarray, radius_mm: float) -> float:
    """Largest fraction of lesion-like voxels in ``core`` moved by any whole-voxel shift of at most ``radius_mm``."""
    idx = np.argwhere(core)
    reach = np.floor(radius_mm / sp + 1e-6).astype(int)
    best = 0.0
    for dk in range(-reach[0], reach[0] + 1):
        for dj in range(-reach[1], reach[1] + 1):
            for di in range(-reach[2], reach[2] + 1):
                shift = np.array([dk, dj, di])
                if float(np.linalg.norm(shift * sp)) > radius_mm + 1e-6:
                    continue
                moved = np.clip(idx + shift, 0, np.array(core.shape) - 1)
                best = max(best, float(lesion_like[tuple(moved.T)].mean()))
    return best


def _signed_distance(pmask: np.ndarray, inside_d: np.ndarray, outside_d: np.ndarray, sp: np.ndarray) -> np.ndarray:
    """Signed distance (mm, > 0 outside) to the prompt's outline, which lies half a voxel beyond its boundary voxels.

    Voxel-centre distances put the first voxels on either side at ±1 voxel, leaving no level between them; shifting
    by half the finest spacing puts the outline at 0, so that a level ``d`` means growth (or shrinkage) by ``d`` mm.
    """
    half = 0.5 * float(np.min(sp))
    return np.where(pmask, half - inside_d, outside_d - half)


def _fit_evidence(
    llr: np.ndarray,
    smooth: np.ndarray,
    les_level: float,
    les_s: np.ndarray,
    bg_s: np.ndarray,
    cfg: AdaptiveConfig,
) -> tuple[np.ndarray, float]:
    """Per-voxel evidence for the outline fit: the models' log-likelihood ratio, or, for a lesion (most frequent
    intensity ``les_level``) within ``fit_linear_cnr`` noise SDs of its background, the equal-variance Gaussian one.

    At such low contrast the kernel estimates overlap almost entirely and their ratio is decided by the tails of
    the two (a background of wider spread makes background-level voxels read as lesion); the Gaussian ratio is
    linear in intensity, so summed over a distance shell it weighs the shell's mean against the half-way level and
    the noise averages out. Also returns the evidence of a voxel at the lesion level (the kernel ratio saturates
    at ``fit_clip``), which scales the cost of moving the partial-volume layer."""
    if bg_s.size < 5:
        return llr, cfg.fit_clip
    bg_level = float(np.median(bg_s))
    noise = max(_noise_sd(les_s, bg_s), cfg.min_sd_hu)
    contrast = les_level - bg_level
    if abs(contrast) >= cfg.fit_linear_cnr * noise:
        return llr, cfg.fit_clip
    ev = contrast * (smooth - 0.5 * (les_level + bg_level)) / noise**2
    # the ratio is linear: tissue beyond the lesion's own intensities, on the side away from the background, would read
    # as the most lesion-like of all (the fat around a liver whose hypodense lesion lies near its edge drew the fitted
    # outline out to the growth limit). Such tissue is neither model's: it is not evidence of the lesion.
    spread = max(_robust_sd(les_s), noise)
    beyond = np.sign(contrast) * (smooth - les_level) > cfg.fit_range_sds * spread
    ev = np.where(beyond, -cfg.fit_clip, ev)
    return np.asarray(ev, dtype=np.float32), 0.5 * contrast**2 / noise**2


def _straddles(les_s: np.ndarray, bg_s: np.ndarray, noise: float, fraction: float) -> bool:
    """Whether the lesion holds tissue on both sides of its background (see ``AdaptiveConfig.straddle_fraction``)."""
    if les_s.size < 10 or bg_s.size == 0:
        return False
    bg_level, margin = float(np.median(bg_s)), 2.0 * max(noise, 1.0)
    return bool(np.mean(les_s > bg_level + margin) >= fraction and np.mean(les_s < bg_level - margin) >= fraction)


def _noise_sd(les_s: np.ndarray, bg_s: np.ndarray) -> float:
    """The image noise: the narrower of the lesion's and the background's robust spreads. A ring across lung and
    chest wall, or lung with its vessels, is wide because it holds several tissues, not because the scan is noisy."""
    if bg_s.size == 0:
        return _robust_sd(les_s) if les_s.size else 0.0
    return min(_robust_sd(les_s), _robust_sd(bg_s)) if les_s.size >= 5 else _robust_sd(bg_s)


def _robust_sd(samples: np.ndarray) -> float:
    """Standard deviation from the median absolute deviation (robust to a minority of other tissue)."""
    return 1.4826 * float(np.median(np.abs(samples - np.median(samples))))


def _fit_offset(evidence: np.ndarray, sdist: np.ndarray, lo_mm: float, hi_mm: float, cfg: AdaptiveConfig) -> float:
    """The level ``d`` of the prompt's signed distance maximising the summed evidence (logits) inside ``sdist <= d``.

    A uniform growth (``d > 0``) or shrinkage (``d < 0``) of the prompt along its own outline; the region energy
    of a one-parameter active contour, solved exactly by a cumulative sum over distance shells.
    """
    step = cfg.fit_step_mm
    edges = np.arange(lo_mm, hi_mm + step, step)
    if edges.size < 2:
        return 0.0
    sel = sdist <= edges[-1]
    shell = np.clip(np.searchsorted(edges, sdist[sel], side="left"), 0, edges.size - 1)
    gain = np.bincount(shell, weights=evidence[sel], minlength=edges.size)
    total = np.cumsum(gain)
    level = float(edges[int(np.argmax(total))])
    # the outline lies midway between the outermost voxels kept and the innermost voxels left out
    kept, left = sdist[sdist <= level], sdist[(sdist > level) & sel]
    if kept.size == 0 or left.size == 0:
        return level
    return 0.5 * (float(kept.max()) + float(left.min()))


def _ball(radius_mm: float, sp: np.ndarray) -> np.ndarray:
    """Structuring element: the voxel offsets within ``radius_mm`` (at least the nearest neighbours' distance)."""
    r = max(radius_mm, float(np.min(sp))) * 1.001
    reach = np.floor(r / sp).astype(int)
    axes = [np.arange(-n, n + 1) * s for n, s in zip(reach, sp, strict=True)]
    k, j, i = np.meshgrid(*axes, indexing="ij")
    return np.asarray(np.sqrt(k**2 + j**2 + i**2) <= r)


def _halfway_boundary(
    seg: np.ndarray, img: np.ndarray, sp: np.ndarray, cfg: AdaptiveConfig, noise_sd: float, lesion_mode: float
) -> np.ndarray:
    """Re-decide the voxel layers either side of ``seg``'s boundary at the half-way level (partial-volume correct).

    A boundary voxel of intensity ``v`` is lesion when ``alpha = (v - B) / (L - B) >= 0.5``: at least half of it is
    lesion. ``B`` is the background (the level of the most frequent tissue in the ring beyond the partial-volume
    reach); ``L`` the local lesion level (Gaussian-weighted mean of the layer just inside the edge), never more extreme
    than the lesion model's most frequent intensity ``lesion_mode`` (a ground-glass rim is lesion tissue in its own
    right, not a blur of the solid core).
    Where the lesion is not resolved (no voxel deeper than the partial-volume reach, e.g. one 5 mm slice), ``L`` comes
    from its more lesion-like half. Left as they are: voxels where lesion and background differ by less than
    ``halfway_min_contrast`` noise SDs, and voxels whose local surroundings are not the background (a lesion abutting
    a structure of its own density, e.g. the chest wall, is bounded by the shape prior, not by intensity).
    """
    if not seg.any():
        return seg
    pv = float(np.min(sp)) + cfg.halfway_pv_mm
    depth = ndi.distance_transform_edt(seg, sampling=sp)
    inner = ndi.binary_erosion(seg) & (depth >= pv) & (depth <= pv + cfg.halfway_layer_mm)
    out_d = ndi.distance_transform_edt(~seg, sampling=sp)
    outer = out_d > pv
    ring = outer & (out_d <= pv + cfg.ring_mm)
    if ring.sum() < 20:
        return seg
    background = dominant_level(img[ring])
    seg_median = float(np.median(img[seg]))
    bright = seg_median > background
    if inner.sum() < 8:
        inner = seg & ((img >= seg_median) if bright else (img <= seg_median))
    sigma = cfg.halfway_radius_mm / sp
    lesion, w_lesion = _local_mean(img, inner, sigma)
    local_bg, w_bg = _local_mean(img, outer, sigma)
    lesion = np.minimum(lesion, lesion_mode) if bright else np.maximum(lesion, lesion_mode)
    contrast = lesion - background
    band = ndi.binary_dilation(seg) & ~ndi.binary_erosion(seg)
    ok = band & (w_lesion > 1e-3) & (w_bg > 1e-3)
    ok &= np.abs(contrast) >= cfg.halfway_min_contrast * max(noise_sd, 1.0)
    ok &= np.abs(local_bg - background) <= 0.5 * np.abs(contrast)
    alpha = (img - background) / np.where(np.abs(contrast) > 1e-6, contrast, 1.0)
    out = seg.copy()
    out[ok] = alpha[ok] >= 0.5
    return out


def _local_mean(img: np.ndarray, mask: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-weighted mean of ``img`` over ``mask`` at every voxel, and the weight behind it."""
    w = ndi.gaussian_filter(mask.astype(np.float32), sigma)
    v = ndi.gaussian_filter(np.where(mask, img, 0.0).astype(np.float32), sigma)
    return v / np.maximum(w, 1e-6), w


def _grow_from_core(
    smooth: np.ndarray, core: np.ndarray, les_s: np.ndarray, sp: np.ndarray, cfg: AdaptiveConfig
) -> np.ndarray:
    """Region of voxels with lesion-like intensity connected to a click (bounded by max_growth_mm)."""
    med = float(np.median(les_s))
    tol = _grow_tolerance(les_s, cfg)
    cand = np.abs(smooth - med) <= tol
    dist = ndi.distance_transform_edt(~core, sampling=sp)
    cand &= dist <= cfg.max_growth_mm
    cand = ndi.binary_opening(cand, iterations=1) | core
    lab, _ = ndi.label(cand)
    keep = np.unique(lab[core])
    region = np.isin(lab, keep[keep > 0])
    return ndi.binary_fill_holes(region)


def _grow_tolerance(les_s: np.ndarray, cfg: AdaptiveConfig) -> float:
    return max(2.5 * _robust_sd(les_s), 2.5 * cfg.min_sd_hu, 25.0)


def _kde(samples: np.ndarray, min_sd: float) -> np.ndarray:
    """Histogram density on ``_BINS`` smoothed by a Gaussian kernel (Silverman bandwidth, floored)."""
    s = np.asarray(samples, np.float64).ravel()
    if s.size == 0:
        return np.full(_BINS.size, 1.0 / _BINS.size)
    if s.size > 20000:
        s = s[:: s.size // 20000 + 1]
    sd = _robust_sd(s) or float(s.std())
    bw = max(min_sd, 1.06 * sd * s.size ** (-0.2))
    hist, _ = np.histogram(np.clip(s, _BINS[0], _BINS[-1]), bins=np.append(_BINS, _BINS[-1] + 2.0))
    pdf = ndi.gaussian_filter1d(hist.astype(np.float64), bw / 2.0, mode="constant")
    pdf = pdf / pdf.sum()
    # a broad component keeps partial-volume tails ordered (far from both models → nearer model wins)
    med = float(np.median(s))
    tail = np.exp(-0.5 * ((_BINS - med) / max(4.0 * bw, 60.0)) ** 2)
    pdf = 0.97 * pdf + 0.03 * tail / tail.sum()
    return pdf + 1e-9


def _lookup(pdf: np.ndarray, values: np.ndarray) -> np.ndarray:
    idx = np.clip(((values - _BINS[0]) / 2.0).astype(np.int64), 0, _BINS.size - 1)
    return pdf[idx]
