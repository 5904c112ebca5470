"""Is a subtraction residual explained by local misregistration? A patch test for new-lesion candidates.

Registration leaves errors a smooth deformation cannot undo: organs slide along the pleura and the abdominal wall,
bowel loops move and deform, vessels and ribs shift with breathing. The voxel-wise tolerance of the detector
(a local max/min of the prior over ± 2–3 mm) absorbs small errors; larger ones leave a residual that looks like
new tissue. Whether the follow-up's *pattern* around a candidate is found in the prior nearby tells them apart:

* take the follow-up patch around the candidate (its bounding box plus a margin) and compare it (mean absolute
  difference) with the warped prior shifted by every offset within ``radius_mm``;
* the offset that best aligns the whole patch is the local registration error there; if at that offset the
  candidate's own voxels match the prior (``core ratio`` = residual inside the candidate at the best offset over
  the residual at no offset, small), the candidate was a structure of the prior that moved — a vessel, a rib, an
  organ edge, a bowel loop — not new tissue. A new lesion is not in the prior anywhere nearby: its ratio stays
  near 1.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

Array = np.ndarray


def core_ratio(
    fu: Array,
    pr: Array,
    comp: Array,
    sl: tuple[slice, ...],
    sp_kji: Array,
    radius_mm: float,
    margin_mm: float,
    ring_voxels: int = 2,
) -> tuple[float, tuple[float, float, float]]:
    """(ratio, best offset in mm (k, j, i)) for the component ``comp`` (bool, the crop ``sl`` of the working grid)
    of follow-up ``fu`` against the warped prior ``pr`` (both on the working grid)."""
    shape = np.array(fu.shape)
    m = np.maximum(1, np.ceil(margin_mm / sp_kji)).astype(int)
    r = np.floor(radius_mm / sp_kji + 1e-6).astype(int)
    lo = np.maximum(0, np.array([s.start for s in sl]) - m)
    hi = np.minimum(shape, np.array([s.stop for s in sl]) + m)
    f = fu[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    core = np.zeros(f.shape, bool)
    off = np.array([s.start for s in sl]) - lo
    core[off[0] : off[0] + comp.shape[0], off[1] : off[1] + comp.shape[1], off[2] : off[2] + comp.shape[2]] = comp
    plo, phi = lo - r, hi + r
    pad = [(int(max(0, -a)), int(max(0, b - n))) for a, b, n in zip(plo, phi, shape, strict=True)]
    src = pr[tuple(slice(int(max(0, a)), int(min(n, b))) for a, b, n in zip(plo, phi, shape, strict=True))]
    p = np.pad(src, pad, mode="edge")
    n0, n1, n2 = f.shape
    core = ndi.binary_dilation(core, iterations=ring_voxels) if ring_voxels else core  # the candidate and its rim
    fc = f[core]
    zero = float(np.abs(fc - p[r[0] : r[0] + n0, r[1] : r[1] + n1, r[2] : r[2] + n2][core]).mean())
    best, best_shift = zero, (0, 0, 0)
    for dk in range(-r[0], r[0] + 1):
        for dj in range(-r[1], r[1] + 1):
            for di in range(-r[2], r[2] + 1):
                if (dk * sp_kji[0]) ** 2 + (dj * sp_kji[1]) ** 2 + (di * sp_kji[2]) ** 2 > radius_mm**2:
                    continue
                q = p[r[0] + dk : r[0] + dk + n0, r[1] + dj : r[1] + dj + n1, r[2] + di : r[2] + di + n2][core]
                cost = float(np.abs(fc - q).mean())
                if cost < best:
                    best, best_shift = cost, (dk, dj, di)
    ratio = best / zero if zero > 0 else 1.0
    return ratio, (best_shift[0] * float(sp_kji[0]), best_shift[1] * float(sp_kji[1]), best_shift[2] * float(sp_kji[2]))


def isolation(
    fu: Array, comp: Array, sl: tuple[slice, ...], sp_kji: Array, margin_mm: float, level: float, dense: bool
) -> float:
    """Fraction of the follow-up structure at the candidate (voxels beyond ``level``, connected to it, within the
    candidate's box plus ``margin_mm``) lying more than one voxel outside the candidate: ≈ 0 for an isolated blob,
    large for a piece of a vessel, a wall or an organ edge that continues beyond it."""
    shape = np.array(fu.shape)
    m = np.maximum(1, np.ceil(margin_mm / sp_kji)).astype(int)
    lo = np.maximum(0, np.array([s.start for s in sl]) - m)
    hi = np.minimum(shape, np.array([s.stop for s in sl]) + m)
    f = fu[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    core = np.zeros(f.shape, bool)
    off = np.array([s.start for s in sl]) - lo
    core[off[0] : off[0] + comp.shape[0], off[1] : off[1] + comp.shape[1], off[2] : off[2] + comp.shape[2]] = comp
    beyond = (f > level) if dense else (f < level)
    lab, _n = ndi.label(beyond | core)
    ids = np.unique(lab[core])
    struct = np.isin(lab, ids[ids > 0])
    grown = ndi.binary_dilation(core, iterations=1)
    n = int(struct.sum())
    return float((struct & ~grown).sum()) / n if n else 0.0
