"""Is a candidate a blob or a piece of a tube or a sheet? The Hessian of the follow-up at the candidate's scale.

Temporal subtraction leaves pieces of structures that moved: a vessel segment in the lung, a rib edge or the
pleura along the sliding seam, a bowel wall. Their residual may look compact (the subtraction cut a short piece
out of a long vessel), but the follow-up *image* around it does not: a vessel is bright along one direction, a
wall or a seam along two. A nodule, a node or a metastasis is bright (or, hypodense, dark) in all three.

The Hessian of the follow-up, Gaussian-smoothed at the candidate's scale (σ = radius/√3, where a sphere's
normalised response peaks; Lindeberg 1998, Frangi et al. 1998), is evaluated where the candidate is most intense
and at its centre (the larger of the two counts: a lobulated lesion's extreme voxel may sit off its centre). Its
eigenvalues, ordered by magnitude |λ1| ≤ |λ2| ≤ |λ3|, give the blob measure |λ1| / |λ3| when all three have the
lesion's sign (negative for a bright blob, positive for a dark one) and 0 otherwise: ≈ 1 for a sphere, ≈ 0 for a
tube (λ1 ≈ 0) or a plate (λ1 ≈ λ2 ≈ 0). It is measured in millimetres, so it does not depend on the scan's grid.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

Array = np.ndarray

_ORDERS = ((2, 0, 0), (0, 2, 0), (0, 0, 2), (1, 1, 0), (1, 0, 1), (0, 1, 1))


def blob_measure(
    image: Array,
    comp: Array,
    sl: tuple[slice, ...],
    sp_kji: Array,
    diameter_mm: float,
    bright: bool,
    beyond: tuple[float, float] | None = None,
) -> float:
    """|λ1|/|λ3| of the Hessian of ``image`` (working grid) at the most intense voxel of the component ``comp``
    (bool, the crop ``sl``), at scale σ = (diameter/2)/√3 (≥ one voxel); 0 when an eigenvalue has the wrong sign
    (``bright``: a denser focus needs all three negative, a darker one all three positive).

    ``beyond`` = (level, fill): voxels darker than ``level`` are set to ``fill`` first — for a darker focus, tissue
    darker than the focus itself (fat or gas beyond the organ's edge) is replaced by the organ's parenchyma, so a
    hypodense lesion at an organ's edge is judged against its own organ, not as a step to the fat."""
    sp = np.asarray(sp_kji, dtype=float)
    sigma_mm = max(diameter_mm / 2.0 / np.sqrt(3.0), float(sp.max()))
    sig_vox = sigma_mm / sp
    m = np.ceil(3.0 * sig_vox).astype(int) + 1
    shape = np.array(image.shape)
    lo = np.maximum(0, np.array([s.start for s in sl]) - m)
    hi = np.minimum(shape, np.array([s.stop for s in sl]) + m)
    crop = image[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float64)
    if beyond is not None:
        crop = np.where(crop < beyond[0], beyond[1], crop)
    off = np.array([s.start for s in sl]) - lo
    vals = np.where(comp, crop[off[0] : off[0] + comp.shape[0], off[1] : off[1] + comp.shape[1],
                               off[2] : off[2] + comp.shape[2]], np.nan)  # fmt: skip
    flat = int(np.nanargmax(vals) if bright else np.nanargmin(vals))
    idx = np.argwhere(comp)
    centre = idx[int(np.argmin(((idx - idx.mean(0)) ** 2).sum(1)))]
    hess = [ndi.gaussian_filter(crop, sig_vox, order=order, mode="nearest") for order in _ORDERS]
    best = 0.0
    for point in (np.array(np.unravel_index(flat, comp.shape)), centre):
        best = max(best, _blob_at(hess, tuple(point + off), sp, bright))
    return best


def _blob_at(hess: list[Array], at: tuple[int, ...], sp: Array, bright: bool) -> float:
    h = np.zeros((3, 3))
    for order, d2 in zip(_ORDERS, hess, strict=True):
        d = float(d2[at]) / float(np.prod(sp ** np.asarray(order)))  # per mm²
        a, b = [ax for ax, o in enumerate(order) for _ in range(o)]
        h[a, b] = h[b, a] = d
    ev = np.linalg.eigvalsh(h)
    ev = ev[np.argsort(np.abs(ev))]
    sign = -1.0 if bright else 1.0
    if np.any(ev * sign <= 0) or ev[2] == 0:
        return 0.0
    return float(abs(ev[0]) / abs(ev[2]))
