"""New-lesion candidates: focal findings in a follow-up CT that were not in the registered prior.

LesionTrack follows the lesions a radiologist annotated; this module looks for the ones nobody annotated because
they did not exist yet (RECIST 1.1: a new lesion means progression once confirmed). Method — temporal subtraction,
made robust to what registration leaves behind:

1. **Working grid.** Both images (the follow-up and the prior already warped onto it) are block-averaged to about
   ``working_spacing_mm`` in-plane/through-plane (integer factors, so the mapping back is exact).
2. **Validity.** Body mask of the follow-up (HU > −950, holes filled slice by slice, largest component); voxels the
   warped prior does not cover (the warp's −1024 default outside the prior's field of view) and a margin around
   them are excluded, as is a zone around bone (> 350 HU) where a shift of the cortex would dominate.
3. **Contrast phase.** A global HU mapping prior → follow-up per 20-HU band of prior intensity (median difference
   over the body, i.e. one offset per tissue class: lung, fat, liver/soft tissue, blood pool) is added to the prior,
   so an arterial-vs-portal phase change or scanner calibration does not show up as new tissue.
4. **Misregistration tolerance.** The follow-up is compared with a local maximum (for new *denser* tissue: lung
   nodules, nodes in fat, hyperdense lesions) or minimum (for new *hypodense* tissue: liver / soft-tissue
   metastases) of the corrected prior over a box of ± ``lung_tolerance_mm`` / ``soft_tolerance_mm``: a vessel or an
   organ edge that moved by a few millimetres is then always matched by prior tissue at least as dense (or as dark)
   nearby, whereas a new lesion is denser (darker) than everything around its site in the prior.
5. **Tissue classes.** Lung (prior < −400 HU): denser-than-prior, lung-channel threshold. Liver / soft tissue
   (−200…250 HU in the prior): denser than prior (lightly smoothed, like lung) or darker than prior (hypodense
   lesions have tens of HU contrast: images smoothed more, against noise).
6. **Anatomy** (:mod:`models.detection.anatomy`, from the images): lungs, gas outside the lungs (bowel, stomach),
   solid organs and the liver — the organ a candidate is named by ("liver", "lung", else "soft tissue").
7. **Candidates.** Hysteresis on the threshold-normalised difference (core ≥ 1, extent ≥ 0.5), connected
   components, minus anything within ``exclusion_margin_mm`` of a tracked lesion; a size test (longest axial
   diameter), a shape test (PCA elongation: vessels and organ-edge slivers are elongated, lesions compact). Then the
   usual false sources are taken out, each with its reason: a difference within ``gas_margin_mm`` of bowel gas in
   either scan (bowel content and loops move); an air-density site outside the lungs (a gas pocket); a darker focus
   outside solid parenchyma (unless the prior around it is homogeneous enhancing parenchyma); a denser focus that is
   a piece of a larger follow-up structure (a vessel, a bowel loop,
   an organ edge: ``max_attached_fraction``); and a denser focus whose pattern the prior holds within
   ``misfit_radius_mm`` (misregistration: sliding at the pleura and the abdominal wall, ribs, vessels —
   :mod:`models.detection.misfit`); a denser focus that is a tube or a sheet in the follow-up image at its own
   scale (the Hessian blob measure, :mod:`models.detection.blobness`: vessel pieces, ribs, the pleura); a darker
   focus that is not a dark blob (a dark vessel, fissure or edge; fat beyond the organ read as parenchyma); and a
   darker focus whose surroundings changed as well (a seam, not a focal change) — for darker foci this replaces the
   misfit test, which in homogeneous parenchyma "explains" a new metastasis by any dark spot ≤ 10 mm away even
   where the registration is right. Shape is judged only along resolved axes (a focus on one or two thick slices:
   in-plane). The confidence is a logistic score of
   contrast, shape, size and how little of the residual the prior nearby explains (0.5 is the operating point); at
   most ``max_candidates`` are returned, the most confident first.

All thresholds are in HU / mm and live in :class:`DetectionOptions`. The cost is a handful of separable filters on
the working grid plus a shift search per surviving focus: seconds per scan on one core (``bench/new_lesions.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from lesiontrack.models.detection.anatomy import Anatomy, find_anatomy
from lesiontrack.models.detection.blobness import blob_measure
from lesiontrack.models.detection.misfit import core_ratio, isolation
from lesiontrack.models.imaging.volume import Volume

Array = np.ndarray


@dataclass(frozen=True)
class DetectedCandidate:
    """One unconfirmed new-lesion candidate on the follow-up grid."""

    mask: np.ndarray  # bool, (nk, nj, ni) on the follow-up grid
    centre_mm: tuple[float, float, float]  # patient LPS
    volume_mm3: float
    diameter_mm: float  # longest in-plane (axial) diameter
    mean_hu: float
    contrast_hu: float  # mean follow-up HU minus mean warped-prior HU inside the mask
    tissue: str  # "lung", "liver" or "soft tissue"
    confidence: float  # 0..1, 0.5 is the operating point
    reasons: tuple[str, ...]  # human-readable evidence
    kind: str = "hyperdense"  # "hyperdense" (denser than the prior there) or "hypodense"
    elongation: float = 1.0  # sqrt(smallest / largest principal variance): 1 = round, → 0 = tubular
    strength: float = 0.0  # peak difference over the tissue's threshold (≥ 1)
    misfit_ratio: float = 1.0  # residual left inside it (and its rim) with the prior shifted ≤ 10 mm to fit best
    attached_fraction: float = 0.0  # share of its follow-up structure lying beyond it (vessel, loop, edge: large)
    surround_ratio: float = 0.0  # residual around it (1.5–4.5 mm) over its own: large where the surroundings moved too
    blobness: float = 1.0  # Hessian |λ1|/|λ3| of the follow-up at its scale: 1 = ball, 0 = tube or sheet (blobness.py)
    rejected: str = ""  # why it is not a candidate (only with DetectionOptions.keep_rejected: diagnostics)


@dataclass(frozen=True)
class DetectionOptions:
    """Knobs of :func:`detect_new_lesions` (HU and mm; defaults are the benchmarked ones)."""

    min_diameter_mm: float = 5.0
    max_diameter_mm: float = 60.0
    min_confidence: float = 0.5
    exclusion_margin_mm: float = 5.0  # around tracked lesions
    working_spacing_mm: float = 1.5
    lung_tolerance_mm: float = 3.0
    """Half-width of the local max filter of the prior in lung: residual misregistration tolerated (vessels move
    with breathing; lung nodules have a contrast of several hundred HU, so a wide tolerance costs little)."""
    soft_tolerance_mm: float = 2.0
    """The same for liver / soft tissue, where lesions have tens of HU contrast and sit close to other tissue."""
    lung_smoothing_mm: float = 0.7
    soft_smoothing_mm: float = 1.8
    lung_threshold_hu: float = 220.0  # follow-up above the local prior maximum, in lung
    soft_hyper_threshold_hu: float = 70.0  # follow-up above the local prior maximum, in fat / soft tissue
    soft_hypo_threshold_hu: float = 16.0  # follow-up below the local prior minimum, in liver / soft tissue
    lung_max_prior_hu: float = -400.0
    soft_prior_range_hu: tuple[float, float] = (-200.0, 250.0)
    hypo_prior_min_hu: float = 10.0  # hypodense lesions are looked for in enhancing parenchyma only
    bone_hu: float = 350.0
    min_elongation: float = 0.44
    surface_margin_mm: float = 0.0
    """Not looked for within this distance of the body surface, where the skin–air edge (1000 HU) moves most."""
    max_soft_contrast_hu: float = 200.0
    """Liver / soft-tissue candidates denser than the prior by more than this are bone, calcium or contrast-filled
    vessels moved by misregistration, not lesions (a new node in fat is ≈ +100–160 HU)."""
    max_candidates: int = 5
    """At most this many candidates per scan (the most confident ones): a reader keeps a short list switched on."""
    misfit_radius_mm: float = 10.0
    """A candidate whose pattern is found in the prior within this distance (the prior, shifted by at most this,
    leaves at most ``max_misfit_ratio`` of the residual inside it) is misregistration, not new (misfit.py)."""
    misfit_margin_mm: float = 6.0  # the neighbourhood looked at around a candidate (structure it is attached to)
    max_misfit_ratio: float = 0.5
    max_attached_fraction: float = 0.7
    """A denser focus whose follow-up structure (brighter than halfway to its surroundings, connected to it, within
    ``misfit_margin_mm``) lies more than this fraction outside it is a piece of a vessel, a bowel loop or an organ
    edge, not a nodule or a node (those stand alone)."""
    gas_margin_mm: float = 5.0
    """Not looked for within this distance of gas outside the lungs (bowel, stomach) in either scan: bowel content
    and loops move between scans."""
    min_blobness: float = 0.4
    """A denser focus must be a blob in the follow-up image at its own scale (Hessian |λ1|/|λ3| ≥ this; ≈ 1 for a
    ball, ≈ 0 for a tube or a sheet: blobness.py). Subtraction cuts compact-looking pieces out of vessels, ribs and
    the pleura that moved; the image around them is still a tube or a sheet."""
    min_dark_blobness: float = 0.0
    """A darker focus must be a dark blob: all three Hessian eigenvalues positive (blob measure above this), with
    tissue darker than the focus itself (fat beyond the organ's edge) read as the organ's parenchyma, so that a
    metastasis at the liver's edge is a blob and a dark vessel, fissure or sliding edge is not."""
    max_surround_ratio: float = 0.2
    """A darker focus is new only where its surroundings agree with the prior: the median |follow-up − prior| in a
    shell 1.5–4.5 mm around it may be at most this fraction of its own change. At a sliding seam (the liver dome
    under the lung base, the abdominal wall) the surroundings differ as well."""
    keep_rejected: bool = False
    """Diagnostics (benchmark): also return what the size, shape, anatomy and misfit tests rejected, with the reason
    in ``rejected`` (never used by the product)."""
    max_residual_fraction: float = 0.01
    """The search is not trusted (:func:`search_new_lesions`) when more than this fraction of the searched tissue
    differs from the registered prior (z ≥ 0.5): the registration left too much misalignment for subtraction."""


@dataclass(frozen=True)
class DetectionFindings:
    """A search's findings and whether they can be trusted (the subtraction residual after registration)."""

    candidates: list[DetectedCandidate]
    residual_fraction: float  # searched tissue that differs from the registered prior
    trusted: bool


def search_new_lesions(
    followup: Volume,
    warped_prior: Volume,
    tracked: np.ndarray | None,
    options: DetectionOptions | None = None,
) -> DetectionFindings:
    """:func:`detect_new_lesions` plus the check that the registration left subtraction meaningful: with more than
    ``max_residual_fraction`` of the searched tissue differing from the prior (patient motion the registration did
    not undo), the candidates would be misregistration, and the search reports itself untrusted."""
    opt = options or DetectionOptions()
    maps = _score_maps(followup, warped_prior, opt)
    if maps is None:
        return DetectionFindings([], 0.0, True)
    # judged where registration must hold and lesions are looked for: lungs and solid organs (the bowel changes
    # between any two scans whatever the registration; darker foci are looked for in solid organs only)
    searchable = maps.valid & ~maps.gas_zone & (maps.anatomy.lung | maps.anatomy.solid)
    differs = (maps.z >= 0.5) & searchable
    searched = int(searchable.sum())
    residual = float(differs.sum()) / searched if searched else 0.0
    if residual > opt.max_residual_fraction:
        return DetectionFindings([], residual, False)
    return DetectionFindings(_detect(followup, warped_prior, tracked, opt, maps), residual, True)


def detect_new_lesions(
    followup: Volume,
    warped_prior: Volume,
    tracked: np.ndarray | None,
    options: DetectionOptions | None = None,
) -> list[DetectedCandidate]:
    """Focal findings in the follow-up that were not in the (registered, warped) prior.

    ``warped_prior`` must be on the follow-up's grid (``Registration.warp_image(prior, default=-1024)``);
    ``tracked`` is a bool mask of the tracked lesions on that grid (or None). Returns candidates with confidence
    ≥ ``options.min_confidence``, sorted by confidence, highest first.
    """
    opt = options or DetectionOptions()
    if not followup.same_grid(warped_prior, atol=1e-3):
        raise ValueError("warped_prior must be on the follow-up grid (warp it with Registration.warp_image first)")
    if tracked is not None and tracked.shape != followup.shape:
        raise ValueError(f"tracked mask shape {tracked.shape} does not match the follow-up grid {followup.shape}")

    return _detect(followup, warped_prior, tracked, opt, _score_maps(followup, warped_prior, opt))


def _detect(
    followup: Volume, warped_prior: Volume, tracked: np.ndarray | None, opt: DetectionOptions, maps: _Maps | None
) -> list[DetectedCandidate]:
    if maps is None:
        return []
    z, channel, pr_s = maps.z, maps.channel, maps.prior_s
    sp_kji, f_kji = maps.spacing_kji, maps.factors
    found = _components(z, maps.spacing, opt)
    if found is None:
        return []
    labels, keep, peak = found

    tracked_w = _block_any(tracked.astype(bool), f_kji) if tracked is not None and tracked.any() else None
    margin = _box(opt.exclusion_margin_mm, sp_kji)
    objects = ndi.find_objects(labels)
    out: list[DetectedCandidate] = []
    for lab in np.nonzero(keep)[0]:
        sl = objects[lab - 1]
        if sl is None:
            continue
        comp = labels[sl] == lab
        if tracked_w is not None and _near_tracked(labels, int(lab), sl, tracked_w, margin, sp_kji, opt):
            continue
        cand = _describe(comp, sl, z[sl], channel[sl], pr_s[sl], sp_kji, float(peak[lab]), opt)
        if cand is None:
            continue
        found_here = _assess(followup, warped_prior, maps, comp, sl, cand, opt)
        if found_here is not None:
            out.append(found_here)
    out.sort(key=lambda c: (c.rejected != "", -c.confidence))
    if opt.keep_rejected:
        return out
    return out[: opt.max_candidates]


def _assess(
    followup: Volume,
    warped_prior: Volume,
    maps: _Maps,
    comp: Array,
    sl: tuple[slice, ...],
    described: tuple[float, str, float, float, float],
    opt: DetectionOptions,
) -> DetectedCandidate | None:
    """One change region (``comp`` in the box ``sl`` of the working grid) judged as a new lesion: its anatomy, misfit
    to the prior, shape and surroundings, the candidate at full resolution with its reasons, or its rejection (None
    when rejected and rejected ones are not kept)."""
    conf, tissue_ch, diameter, elong, strength = described
    channel, sp_kji, f_kji = maps.channel, maps.spacing_kji, maps.factors
    reject, ratio, iso = _anatomy_and_misfit(maps, maps.gas_zone, comp, sl, opt)
    ch_major = int(np.argmax(np.bincount(channel[sl][comp], minlength=3)))
    surround = _surround_ratio(maps, comp, sl, ch_major)
    blob = blob_measure(
        maps.fu_s if ch_major == 2 else maps.fu_l, comp, sl, sp_kji, diameter, ch_major != 2,
        _organ_level(maps, comp, sl) if ch_major == 2 else None,
    )  # fmt: skip
    if ch_major != 2:  # a darker focus is judged by its surroundings, not by the misfit (_anatomy_and_misfit)
        conf = _with_misfit(conf, ratio)
    if not reject and ch_major != 2 and blob < opt.min_blobness:
        reject = f"tube- or sheet-like in the follow-up (blob measure {blob:.2f}: a vessel, rib or wall piece)"
    if not reject and ch_major == 2 and blob <= opt.min_dark_blobness:
        reject = f"not a dark blob in the follow-up (blob measure {blob:.2f}: a dark vessel, fissure or edge)"
    if not reject and ch_major == 2 and surround > opt.max_surround_ratio:
        reject = f"its surroundings changed too (×{surround:.2f} of its own change: a seam or a moved edge)"
    if not reject and conf < opt.min_confidence:
        reject = f"confidence {conf:.2f} < {opt.min_confidence:.2f}"
    if reject and not opt.keep_rejected:
        return None
    mask = _upsample_mask(comp, sl, f_kji, followup.shape)
    idx = np.argwhere(mask)
    centre = followup.index_to_patient(idx[:, ::-1].mean(0))
    vals_f = followup.array[mask].astype(np.float64)
    vals_p = warped_prior.array[mask].astype(np.float64)
    mean_hu = float(vals_f.mean())
    contrast = float(mean_hu - vals_p.mean())
    tissue = _organ(maps.anatomy, comp, sl, tissue_ch)  # no liver found in the image: "soft tissue", not a guess
    if not reject and tissue != "lung" and contrast > opt.max_soft_contrast_hu:
        reject = f"{contrast:+.0f} HU: bone, calcium or contrast-filled vessel moved"
    if reject and not opt.keep_rejected:
        return None
    kind = "hypodense" if contrast < 0 else "hyperdense"
    volume = float(mask.sum()) * followup.voxel_volume_mm3()
    reasons = (
        f"new {diameter:.0f} mm {kind} focus in {tissue}",
        f"{contrast:+.0f} HU vs prior",
        f"{'compact' if elong >= 0.5 else 'elongated'} (elongation {elong:.2f})",
        f"not in the prior within {opt.misfit_radius_mm:g} mm (residual ×{ratio:.2f} at the best fit)",
        f"blob measure {blob:.2f}, surroundings changed ×{surround:.2f} of it",
        f"volume {volume / 1000.0:.2f} mL",
    )
    return DetectedCandidate(
        mask=mask,
        centre_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
        volume_mm3=volume,
        diameter_mm=diameter,
        mean_hu=mean_hu,
        contrast_hu=contrast,
        tissue=tissue,
        confidence=conf,
        reasons=reasons,
        kind=kind,
        elongation=elong,
        strength=strength,
        misfit_ratio=ratio,
        attached_fraction=iso,
        blobness=blob,
        surround_ratio=surround,
        rejected=reject,
    )


def _components(z: Array, sp: Array, opt: DetectionOptions) -> tuple[Array, Array, Array] | None:
    """Connected regions of the change map (z ≥ 0.5), which of them peak at z ≥ 1 with a plausible size, and
    their peaks; None when there is no region."""
    extent = z >= 0.5
    labels, n = ndi.label(extent)
    if n == 0:
        return None
    lab_flat = labels.ravel()
    counts = np.bincount(lab_flat, minlength=n + 1)
    peak = ndi.maximum(z, labels, index=np.arange(n + 1))
    vox_w = float(np.prod(sp))
    d_eq = (6.0 * counts * vox_w / math.pi) ** (1.0 / 3.0)
    keep = (np.asarray(peak) >= 1.0) & (d_eq >= 0.5 * opt.min_diameter_mm) & (d_eq <= 1.5 * opt.max_diameter_mm)
    keep[0] = False
    return labels, keep, np.asarray(peak)


def _near_tracked(
    labels: Array,
    lab: int,
    sl: tuple[slice, ...],
    tracked_w: Array,
    margin: tuple[int, ...],
    sp_kji: Array,
    opt: DetectionOptions,
) -> bool:
    """Whether region ``lab`` lies within ``opt.exclusion_margin_mm`` of a tracked lesion."""
    pad = tuple(
        slice(max(0, s.start - m // 2), min(dim, s.stop + m // 2))
        for s, m, dim in zip(sl, margin, labels.shape, strict=True)
    )
    t_crop = tracked_w[pad]
    if not t_crop.any():
        return False
    c_full = labels[pad] == lab
    near = ndi.distance_transform_edt(~c_full, sampling=sp_kji)
    return bool(np.any(near[t_crop] <= opt.exclusion_margin_mm))


def _anatomy_and_misfit(
    maps: _Maps, gas_zone: Array, comp: Array, sl: tuple[slice, ...], opt: DetectionOptions
) -> tuple[str, float, float]:
    """(why the component is not a new lesion or "", its misfit ratio, its attached fraction): bowel gas beside it,
    an air-density site outside the lungs, a hypodense site outside solid parenchyma, a piece of a larger
    structure, or its pattern found in the prior nearby."""
    anat = maps.anatomy
    ch = int(np.argmax(np.bincount(maps.channel[sl][comp], minlength=3)))
    if gas_zone[sl][comp].any():
        return f"within {opt.gas_margin_mm:g} mm of gas outside the lungs (bowel or stomach content moves)", 1.0, 0.0
    if ch == 0 and float(anat.lung[sl][comp].mean()) < 0.5:
        return "air-density site outside the lungs (a gas pocket changed)", 1.0, 0.0
    if (
        ch == 2
        and float(anat.solid[sl][comp].mean()) < 0.5
        and not _liver_like(maps.prior_s, sl, comp, maps.spacing_kji)
    ):
        return "hypodense outside solid parenchyma (bowel, fluid or fat planes)", 1.0, 0.0
    fu, pr = (maps.fu_s, maps.prior_s) if ch == 2 else (maps.fu_l, maps.prior_l)
    # a darker focus is compared with its rim: partial volume at an organ's edge has every value in between
    rim = 1 if ch == 2 else 0
    ratio, shift = core_ratio(fu, pr, comp, sl, maps.spacing_kji, opt.misfit_radius_mm, opt.misfit_margin_mm, rim)
    vals = fu[sl][comp]
    ring = ndi.binary_dilation(comp, iterations=2) & ~comp
    bg = float(np.median(fu[sl][ring])) if ring.any() else float(np.median(fu))
    level = 0.5 * (float(vals.mean()) + bg)
    iso = isolation(fu, comp, sl, maps.spacing_kji, opt.misfit_margin_mm, level, ch != 2)
    if ch != 2 and iso > opt.max_attached_fraction:
        return (
            f"part of a larger structure ({iso:.0%} of it beyond the focus: vessel, bowel loop or organ edge)",
            ratio,
            iso,
        )
    # a darker focus is judged by its surroundings instead (_surround_ratio): homogeneous parenchyma fits any
    # shift, so a dark spot of the prior ≤ 10 mm away "explains" a new hypodense metastasis where the
    # registration is right; a misregistered seam shows in the surroundings
    if ch != 2 and ratio < opt.max_misfit_ratio:
        dist = float(np.linalg.norm(shift))
        return f"found in the prior {dist:.0f} mm away (misregistration; residual ×{ratio:.2f})", ratio, iso
    return "", ratio, iso


def _organ_level(maps: _Maps, comp: Array, sl: tuple[slice, ...]) -> tuple[float, float]:
    """(level, fill) for the blob measure of a darker focus: anything darker than the focus's darkest voxel less
    20 HU is not its organ (fat or gas beyond the edge) and reads as the organ's parenchyma around it (the median
    of the prior in a 2–6 mm ring)."""
    vals = maps.fu_s[sl][comp]
    pad = 4
    lo = [max(0, s.start - pad) for s in sl]
    hi = [min(n, s.stop + pad) for s, n in zip(sl, maps.fu_s.shape, strict=True)]
    core = np.zeros(tuple(b - a for a, b in zip(lo, hi, strict=True)), bool)
    core[tuple(slice(s.start - a, s.stop - a) for s, a in zip(sl, lo, strict=True))] = comp
    ring = ndi.binary_dilation(core, iterations=3) & ~ndi.binary_dilation(core, iterations=1)
    pr = maps.prior_s[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))][ring]
    level = float(vals.min()) - 20.0
    parenchyma = pr[pr >= level]
    return level, float(np.median(parenchyma)) if parenchyma.size else float(np.median(vals))


def _surround_ratio(maps: _Maps, comp: Array, sl: tuple[slice, ...], ch: int) -> float:
    """Median |follow-up − prior| in a shell 1–3 working voxels around the component over the median difference
    inside it: a new lesion changes its own site only (small), a seam or a moved structure its surroundings too."""
    fu, pr = (maps.fu_s, maps.prior_s) if ch == 2 else (maps.fu_l, maps.prior_l)
    pad = 4
    lo = [max(0, s.start - pad) for s in sl]
    hi = [min(n, s.stop + pad) for s, n in zip(sl, fu.shape, strict=True)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    core = np.zeros(tuple(b - a for a, b in zip(lo, hi, strict=True)), bool)
    core[tuple(slice(s.start - a, s.stop - a) for s, a in zip(sl, lo, strict=True))] = comp
    shell = ndi.binary_dilation(core, iterations=3) & ~ndi.binary_dilation(core, iterations=1)
    diff = fu[box] - pr[box]
    inside = abs(float(np.median(diff[core])))
    if not shell.any() or inside == 0.0:
        return 0.0
    return float(np.median(np.abs(diff[shell]))) / inside


def _with_misfit(conf: float, ratio: float) -> float:
    """The confidence, raised for a residual the prior nowhere nearby explains, lowered for one it partly does."""
    score = math.log(max(conf, 1e-6) / max(1.0 - conf, 1e-6)) + 10.0 * (min(ratio, 1.0) - 0.8)
    return 1.0 / (1.0 + math.exp(-score))


def _organ(anat: Anatomy, comp: Array, sl: tuple[slice, ...], tissue: str) -> str:
    """The organ a candidate lies in: lung, liver, else soft tissue (the detector's channel as a fallback)."""
    if float(anat.lung[sl][comp].mean()) >= 0.5:
        return "lung"
    if float(anat.liver[sl][comp].mean()) >= 0.5:
        return "liver"
    return "soft tissue" if tissue == "lung" else tissue


@dataclass
class _Maps:
    """Working-grid score maps (internal; exposed for the benchmark's diagnostics)."""

    z: Array  # threshold-normalised difference (≥ 1: core, ≥ 0.5: extent)
    channel: Array  # 0 lung, 1 soft-tissue denser, 2 soft-tissue darker
    prior_s: Array  # corrected, smoothed prior
    valid: Array
    spacing: Array  # working spacing (i, j, k)
    spacing_kji: Array
    factors: tuple[int, int, int]  # block factors (k, j, i)
    fu_l: Array  # follow-up, lightly smoothed (lung channel)
    prior_l: Array  # corrected prior, lightly smoothed
    fu_s: Array  # follow-up, smoothed (soft tissue)
    anatomy: Anatomy
    gas_zone: Array  # within gas_margin_mm of gas outside the lungs: not searched


def _score_maps(followup: Volume, warped_prior: Volume, opt: DetectionOptions) -> _Maps | None:
    factors = np.maximum(1, np.floor(opt.working_spacing_mm / followup.spacing + 0.5).astype(int))  # i, j, k
    f_kji = (int(factors[2]), int(factors[1]), int(factors[0]))
    sp = followup.spacing * factors  # working spacing (i, j, k)
    sp_kji = sp[::-1]
    fu = _block_mean(followup.array, f_kji)
    pr = _block_mean(warped_prior.array, f_kji)
    if min(fu.shape) < 3:
        return None

    fu_l = ndi.gaussian_filter(fu, opt.lung_smoothing_mm / sp_kji, mode="nearest")
    pr_l = ndi.gaussian_filter(pr, opt.lung_smoothing_mm / sp_kji, mode="nearest")
    fu_s = ndi.gaussian_filter(fu, opt.soft_smoothing_mm / sp_kji, mode="nearest")
    pr_s = ndi.gaussian_filter(pr, opt.soft_smoothing_mm / sp_kji, mode="nearest")

    body = _body_mask(fu_s)
    # outside the prior's field of view the warp returns exactly -1024 HU: where the follow-up has tissue there,
    # nothing was compared (real air, e.g. the trachea, is air in both and stays valid)
    uncovered = (pr <= -1023.0) & (fu_s > -900.0)
    if opt.surface_margin_mm > 0:
        body &= ~ndi.maximum_filter(~body, size=_box(opt.surface_margin_mm, sp_kji))
    valid = body & ~ndi.maximum_filter(uncovered, size=_box(opt.lung_tolerance_mm + 4.0, sp_kji))
    valid &= ~ndi.maximum_filter((pr_s > opt.bone_hu) | (fu_s > opt.bone_hu), size=_box(4.0, sp_kji))

    centres, offsets = _band_offsets(pr_s, fu_s, valid)
    pr_l += np.interp(pr_l, centres, offsets).astype(np.float32)
    pr_s += np.interp(pr_s, centres, offsets).astype(np.float32)

    pr_l_max = ndi.maximum_filter(pr_l, size=_box(opt.lung_tolerance_mm, sp_kji))
    pr_h_max = ndi.maximum_filter(pr_l, size=_box(opt.soft_tolerance_mm, sp_kji))
    pr_s_min = ndi.minimum_filter(pr_s, size=_box(opt.soft_tolerance_mm, sp_kji))

    lung = valid & (pr_s < opt.lung_max_prior_hu)
    soft = valid & (pr_s >= opt.soft_prior_range_hu[0]) & (pr_s <= opt.soft_prior_range_hu[1])
    z_lung = np.where(lung, (fu_l - pr_l_max) / opt.lung_threshold_hu, 0.0).astype(np.float32)
    z_hyper = np.where(soft, (fu_l - pr_h_max) / opt.soft_hyper_threshold_hu, 0.0).astype(np.float32)
    hypo_ok = soft & (pr_s >= opt.hypo_prior_min_hu) & (fu_s > -30.0)
    z_hypo = np.where(hypo_ok, (pr_s_min - fu_s) / opt.soft_hypo_threshold_hu, 0.0).astype(np.float32)
    z = np.maximum(np.maximum(z_lung, z_hyper), z_hypo)
    channel = np.argmax(np.stack([z_lung, z_hyper, z_hypo]), axis=0).astype(np.uint8)

    # patient x of each working column and z of each working slice (axial grids: the patient's right, caudal)
    n_k, n_j, n_i = fu.shape
    mid_j, mid_k, mid_i = (n_j * f_kji[1] - 1) / 2.0, (n_k * f_kji[0] - 1) / 2.0, (n_i * f_kji[2] - 1) / 2.0
    ii = np.arange(n_i) * f_kji[2] + (f_kji[2] - 1) / 2.0
    kk = np.arange(n_k) * f_kji[0] + (f_kji[0] - 1) / 2.0
    x_mm = followup.index_to_patient(np.stack([ii, np.full(n_i, mid_j), np.full(n_i, mid_k)], 1))[:, 0]
    z_mm = followup.index_to_patient(np.stack([np.full(n_k, mid_i), np.full(n_k, mid_j), kk], 1))[:, 2]
    anatomy = find_anatomy(fu_s, pr_s, body, sp_kji, x_mm, z_mm, uncovered=pr <= -1023.0)
    gas_zone = ndi.maximum_filter(anatomy.gas, size=_box(opt.gas_margin_mm, sp_kji))
    return _Maps(z, channel, pr_s, valid, sp, sp_kji, f_kji, fu_l, pr_l, fu_s, anatomy, gas_zone)


# -- features and confidence ----------------------------------------------------------------------------------
def _describe(
    comp: Array,
    sl: tuple[slice, ...],
    z: Array,
    channel: Array,
    prior_s: Array,
    sp_kji: Array,
    peak: float,
    opt: DetectionOptions,
) -> tuple[float, str, float, float, float] | None:
    """(confidence, tissue, axial diameter mm, elongation, strength) or None when size/shape rule it out."""
    idx = np.argwhere(comp)
    diameter = _axial_diameter(idx, sp_kji)
    if diameter < 0.8 * opt.min_diameter_mm or diameter > opt.max_diameter_mm:  # 0.8: voxel quantisation
        return None
    elong = _elongation(idx, sp_kji)
    if elong < opt.min_elongation:
        return None
    ch = np.bincount(channel[comp], minlength=3)
    tissue = "lung" if int(np.argmax(ch)) == 0 else "soft tissue"
    mean_z = float(z[comp].mean())
    # logistic score: contrast (peak and mean over the threshold), compactness, size near the lower limit
    score = (
        -1.0
        + 2.0 * math.log(max(peak, 1e-3))
        + 2.5 * math.log(max(mean_z, 1e-3) / 0.7)
        + 8.0 * (elong - 0.45)
        + 3.0 * min(0.0, (diameter - 1.2 * opt.min_diameter_mm) / opt.min_diameter_mm)
    )
    conf = 1.0 / (1.0 + math.exp(-score))
    return conf, tissue, diameter, elong, peak


def _elongation(idx: Array, sp_kji: Array) -> float:
    """sqrt(smallest / largest principal variance) of the voxels ``idx`` (k, j, i) in mm: 1 round, → 0 tubular.

    Along an axis the scan does not resolve the shape is not judged: a focus on one or two slices that are at
    least twice as thick as the pixels are wide (a 10 mm lesion on one 5 mm slice) has an unknown through-plane
    extent, so its elongation is the in-plane one (otherwise every such lesion would read as a flat sheet)."""
    pts = idx * sp_kji
    thick = float(sp_kji[0]) >= 2.0 * float(np.max(sp_kji[1:]))
    axes = slice(1, 3) if thick and len(np.unique(idx[:, 0])) <= 2 else slice(0, 3)
    pts = pts[:, axes]
    dim = pts.shape[1]
    cov = np.cov(pts.T) if len(pts) > 1 else np.zeros((dim, dim))
    cov = cov + np.diag(
        np.asarray(sp_kji)[axes] ** 2 / 12.0
    )  # a voxel has extent: one-slice components are not degenerate
    ev = np.clip(np.linalg.eigvalsh(cov), 1e-6, None)
    return float(math.sqrt(ev[0] / ev[-1]))


def _axial_diameter(idx: Array, sp_kji: Array) -> float:
    """Longest in-plane distance between voxels of one slice (+ one voxel for the voxels' own extent)."""
    best = 0.0
    for k in np.unique(idx[:, 0]):
        p = idx[idx[:, 0] == k][:, 1:] * sp_kji[1:]
        if len(p) > 400:  # extreme points suffice: take the in-plane outline via projections on 32 directions
            ang = np.linspace(0, np.pi, 32, endpoint=False)
            proj = p @ np.stack([np.cos(ang), np.sin(ang)])
            p = p[np.unique(np.concatenate([proj.argmin(0), proj.argmax(0)]))]
        if len(p) > 1:
            d = np.sqrt(((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)).max()
            best = max(best, float(d))
    return best + float(np.mean(sp_kji[1:]))


def _liver_like(prior_s: Array, sl: tuple[slice, ...], comp: Array, sp_kji: Array) -> bool:
    """The prior around the site is large homogeneous enhancing parenchyma (liver-like, 70–170 HU)."""
    ring_w = _box(8.0, sp_kji)
    pad = tuple(
        slice(max(0, s.start - r), min(n, s.stop + r)) for s, r, n in zip(sl, ring_w, prior_s.shape, strict=True)
    )
    full = np.zeros(tuple(p.stop - p.start for p in pad), bool)
    inner = tuple(slice(s.start - p.start, s.stop - p.start) for s, p in zip(sl, pad, strict=True))
    full[inner] = comp
    ring = ndi.maximum_filter(full, size=ring_w) & ~full
    vals = prior_s[pad][ring]
    if vals.size < 10:
        return False
    med = float(np.median(vals))
    return 70.0 <= med <= 170.0 and float(np.mean(np.abs(vals - med) < 30.0)) > 0.8


# -- image helpers --------------------------------------------------------------------------------------------
def _box(radius_mm: float, sp_kji: Array) -> tuple[int, int, int]:
    """Odd box size per axis covering ± radius_mm."""
    r = np.floor(radius_mm / np.asarray(sp_kji) + 0.5).astype(int)
    k, j, i = (int(2 * v + 1) for v in r)
    return (k, j, i)


def _block_mean(a: Array, f: tuple[int, int, int]) -> Array:
    n = [s // fi * fi for s, fi in zip(a.shape, f, strict=True)]
    if f == (1, 1, 1):
        return a.astype(np.float32)
    v = a[: n[0], : n[1], : n[2]].astype(np.float32)
    return v.reshape(n[0] // f[0], f[0], n[1] // f[1], f[1], n[2] // f[2], f[2]).mean(axis=(1, 3, 5))


def _block_any(a: Array, f: tuple[int, int, int]) -> Array:
    n = [s // fi * fi for s, fi in zip(a.shape, f, strict=True)]
    v = a[: n[0], : n[1], : n[2]]
    return np.asarray(v.reshape(n[0] // f[0], f[0], n[1] // f[1], f[1], n[2] // f[2], f[2]).any(axis=(1, 3, 5)))


def _upsample_mask(comp: Array, sl: tuple[slice, ...], f: tuple[int, int, int], shape: tuple[int, ...]) -> Array:
    up = comp
    for ax, fa in enumerate(f):
        if fa > 1:
            up = np.repeat(up, fa, axis=ax)
    mask = np.zeros(shape, bool)
    lo = [s.start * fa for s, fa in zip(sl, f, strict=True)]
    mask[lo[0] : lo[0] + up.shape[0], lo[1] : lo[1] + up.shape[1], lo[2] : lo[2] + up.shape[2]] = up
    return mask


def _body_mask(fu_s: Array) -> Array:
    """Patient body: everything denser than air (> −950 HU, so lung parenchyma counts even where the field of view
    cuts through the chest and the lungs touch the image border), holes filled per slice, largest component."""
    dense = fu_s > -950.0
    filled = np.empty_like(dense)
    for k in range(dense.shape[0]):
        filled[k] = ndi.binary_fill_holes(dense[k])
    labels, n = ndi.label(filled)
    if n == 0:
        return filled
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == int(np.argmax(counts))


def _band_offsets(prior_s: Array, fu_s: Array, valid: Array, band: float = 20.0) -> tuple[Array, Array]:
    """Median follow-up − prior difference per prior-HU band over the body: the global per-tissue HU shift."""
    centres = np.arange(-1000.0 + band / 2, 600.0, band)
    offsets = np.zeros_like(centres)
    idx = np.flatnonzero(valid)
    if idx.size == 0:
        return centres, offsets
    if idx.size > 400_000:
        idx = idx[:: idx.size // 400_000 + 1]
    p = prior_s.ravel()[idx]
    d = fu_s.ravel()[idx] - p
    b = np.clip(((p + 1000.0) // band).astype(int), 0, len(centres) - 1)
    order = np.argsort(b, kind="stable")
    b, d = b[order], d[order]
    edges = np.searchsorted(b, np.arange(len(centres) + 1))
    have = np.zeros(len(centres), bool)
    for m in range(len(centres)):
        seg = d[edges[m] : edges[m + 1]]
        if seg.size >= 200:
            offsets[m] = float(np.median(seg))
            have[m] = True
    if not have.any():
        return centres, np.zeros_like(centres)
    offsets = np.interp(centres, centres[have], offsets[have])
    offsets = ndi.median_filter(offsets, size=3, mode="nearest")
    return centres, np.clip(offsets, -80.0, 80.0)
