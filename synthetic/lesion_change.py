"""Lesion-level changes for synthetic follow-ups: growth/shrinkage, disappearance and new lesions.

Growth and shrinkage follow LesionLocator (seed 000, eq. 5–6 and appendix 7.1), an anatomy-informed deformation
around each lesion::

    V = ∇(G_σs * S_lesion) · A(x),      A(x) = A · (G_σr * r(x)),   r ~ U(r_min, r_max)

applied in several moderate stages (recomputing S after each), pulling the image as ``I'(x) = I(x + V(x))`` so a
positive amplitude grows the lesion and a negative one shrinks it. σs is adapted to lesion size (4–5.5 mm for
typical lesions), A is drawn from {-22, -18, 15, 25} (mm², as in the paper's voxel units at ~1 mm), σr = 3 mm.
The paper quotes r in (-3.5, 3.5); with a zero-mean r the smoothed amplitude would average out, so the default
here is a positive modulation r ∈ (0.5, 1.5) — pass ``r_range`` to change it.

All work happens on a crop around the lesion, in the baseline grid, so it is cheap for any image size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lesiontrack.models.imaging.volume import Volume

Array = np.ndarray
AMPLITUDES = (-22.0, -18.0, 15.0, 25.0)


@dataclass
class GrowthParams:
    amplitude: float
    stages: int
    sigma_s_mm: float
    sigma_r_mm: float = 3.0
    r_range: tuple[float, float] = (0.5, 1.5)


def _crop(mask: Array, margin_vox: Array) -> tuple[slice, ...] | None:
    idx = np.nonzero(mask)
    if not idx[0].size:
        return None
    return tuple(
        slice(max(0, int(i.min()) - int(m)), min(n, int(i.max()) + int(m) + 1))
        for i, m, n in zip(idx, margin_vox, mask.shape, strict=True)
    )


def default_growth(rng: np.random.Generator, lesion_volume_mm3: float, amplitude: float | None = None) -> GrowthParams:
    """Size-adapted parameters: bigger lesions get a wider σs and more stages."""
    r_eq = (3 * max(lesion_volume_mm3, 1.0) / (4 * np.pi)) ** (1 / 3)
    sigma = float(np.clip(2.0 + 0.3 * r_eq, 2.5, 5.5))
    stages = int(np.clip(round(r_eq / 4), 2, 4))
    amp = float(rng.choice(AMPLITUDES)) if amplitude is None else float(amplitude)
    return GrowthParams(amp, stages, sigma)


def grow_lesion(
    image: Volume, labels: Volume, label: int, params: GrowthParams, rng: np.random.Generator
) -> tuple[Volume, Volume]:
    """Grow (A > 0) or shrink (A < 0) lesion ``label`` in place-equivalent copies of ``image`` and ``labels``."""
    img = image.array.copy()
    lab = labels.array.copy()
    sp_kji = image.spacing[::-1]
    margin_mm = 3 * params.sigma_s_mm + abs(params.amplitude) * 0.3 + 6
    for _ in range(params.stages):
        mask = lab == label
        box = _crop(mask, np.ceil(margin_mm / sp_kji))
        if box is None:
            break
        sub_lab = lab[box]
        sub_img = img[box].astype(np.float32)
        s = (sub_lab == label).astype(np.float32)
        blurred = ndimage.gaussian_filter(s, sigma=params.sigma_s_mm / sp_kji, mode="constant")
        grads = np.gradient(blurred, *sp_kji)  # per-mm derivatives along k, j, i
        r = rng.uniform(params.r_range[0], params.r_range[1], s.shape).astype(np.float32)
        amp = params.amplitude * ndimage.gaussian_filter(r, sigma=params.sigma_r_mm / sp_kji, mode="nearest")
        # displacement in voxel units along (k, j, i): mm / spacing
        coords = np.indices(s.shape, dtype=np.float32)
        for ax in range(3):
            coords[ax] += grads[ax] * amp / np.float32(sp_kji[ax])
        warped = ndimage.map_coordinates(sub_img, coords, order=1, mode="nearest", prefilter=False)
        warped_lab = ndimage.map_coordinates(sub_lab, coords, order=0, mode="nearest", prefilter=False)
        if np.issubdtype(img.dtype, np.integer):
            warped = np.rint(warped)
        img[box] = warped.astype(img.dtype)
        # only this lesion's label moves; other labels keep their voxels unless this lesion grew over them
        new_sub = sub_lab.copy()
        new_sub[sub_lab == label] = 0
        new_sub[warped_lab == label] = label
        lab[box] = new_sub
    return image.with_array(img), labels.with_array(lab)


def remove_lesion(
    image: Volume, labels: Volume, label: int, rng: np.random.Generator, noise_hu: float = 12.0
) -> tuple[Volume, Volume]:
    """Make a lesion vanish: fill its (slightly dilated) voxels with the dominant surrounding tissue, drop its label.

    The fill level is the histogram mode of a 5 mm shell around the lesion (so a node in fat becomes fat even if it
    touches an organ), with that tissue's noise, blended over ~1 mm at the edge.
    """
    img = image.array.copy()
    lab = labels.array.copy()
    sp_kji = image.spacing[::-1]
    mask = lab == label
    box = _crop(mask, np.ceil(15.0 / sp_kji))
    if box is None:
        return image, labels
    m = mask[box]
    grow = np.maximum(1, np.round(2.0 / sp_kji)).astype(int)
    m = ndimage.binary_dilation(m, structure=np.ones(tuple(2 * g + 1 for g in grow), bool))
    sub = img[box].astype(np.float32)
    ring_w = np.maximum(1, np.round(5.0 / sp_kji)).astype(int)
    ring = ndimage.binary_dilation(m, structure=np.ones(tuple(2 * g + 1 for g in ring_w), bool)) & ~m
    ring_vals = sub[ring] if ring.any() else sub[~m]
    # the dominant surrounding tissue (histogram mode), not a blend of everything around the lesion
    hist, edges = np.histogram(ring_vals, bins=np.arange(-1050, 1100, 25))
    mode = float(edges[np.argmax(hist)] + 12.5)
    close = ring_vals[np.abs(ring_vals - mode) < 60]
    level = float(np.median(close)) if close.size else mode
    sd = float(np.clip(np.std(close), 3.0, 40.0)) if close.size > 10 else noise_hu
    grain = ndimage.gaussian_filter(rng.standard_normal(sub.shape).astype(np.float32), sigma=(0.0, 0.8, 0.8))
    fill = level + grain * np.float32(sd / max(float(grain.std()), 1e-6))  # CT-like correlated noise
    w = ndimage.gaussian_filter(m.astype(np.float32), sigma=1.0 / sp_kji)
    w = np.where(m, 1.0, w)
    out = sub * (1 - w) + fill * w
    if np.issubdtype(img.dtype, np.integer):
        out = np.rint(out)
    img[box] = out.astype(img.dtype)
    lab[mask] = 0
    return image.with_array(img), labels.with_array(lab)


def insert_lesion(
    image: Volume,
    labels: Volume,
    label: int,
    center_mm: Array,
    radius_mm: float,
    hu: float,
    rng: np.random.Generator,
    noise_hu: float = 12.0,
) -> tuple[Volume, Volume]:
    """Insert a new lobulated lesion (label ``label``) of attenuation ``hu`` with partial-volume edges."""
    img = image.array.copy()
    lab = labels.array.copy()
    sp_kji = image.spacing[::-1]
    c_idx = image.patient_to_index(np.asarray(center_mm, float))[::-1]  # k, j, i
    half = np.ceil((radius_mm * 1.8 + 4) / sp_kji).astype(int)
    lo = np.maximum(0, np.floor(c_idx).astype(int) - half)
    hi = np.minimum(np.array(img.shape), np.floor(c_idx).astype(int) + half + 1)
    if np.any(hi <= lo):
        raise ValueError(f"lesion centre {center_mm} is outside the volume")
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    kk, jj, ii = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij")
    pts = image.index_to_patient(np.stack([ii, jj, kk], -1).astype(float))
    f = np.linalg.norm(pts - center_mm, axis=-1) / radius_mm
    for _ in range(int(rng.integers(1, 4))):  # lobulation
        lc = np.asarray(center_mm) + rng.normal(0, radius_mm * 0.4, 3)
        f = np.minimum(f, np.linalg.norm(pts - lc, axis=-1) / (radius_mm * rng.uniform(0.5, 0.75)))
    inside = f < 1.0
    w = ndimage.gaussian_filter(inside.astype(np.float32), sigma=0.8 / sp_kji)
    sub = img[box].astype(np.float32)
    new = sub * (1 - w) + np.float32(hu) * w + w * rng.normal(0, noise_hu, w.shape).astype(np.float32)
    if np.issubdtype(img.dtype, np.integer):
        new = np.rint(new)
    img[box] = new.astype(img.dtype)
    sub_lab = lab[box]
    sub_lab[inside] = label
    lab[box] = sub_lab
    return image.with_array(img), labels.with_array(lab)
