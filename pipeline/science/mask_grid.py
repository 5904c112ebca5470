"""Put a binary lesion mask onto a reference (CT) grid without changing its shape when the grids align.

When every voxel centre of the mask grid falls on a voxel centre of the reference grid (same spacing, axes parallel
up to sign/permutation — e.g. a SEG stored bottom-up or cropped to its non-empty frames), voxels are copied by
index, exactly. Otherwise the mask is resampled with nearest-neighbour interpolation (SimpleITK). Label-Gaussian
smoothing (``Volume.resample_to(label=True)``) is deliberately not used: it changes masks even on aligned grids.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from lesiontrack.models.imaging.volume import Volume


def mask_onto_grid(mask: Volume, reference: Volume, tol: float = 1e-3) -> np.ndarray:
    """Boolean array on ``reference``'s grid (``[k, j, i]``)."""
    src = np.asarray(mask.array) > 0
    if mask.same_grid(reference, atol=tol):
        return src.copy()
    # index mapping mask (i, j, k) → reference (i, j, k) is affine: r = A @ m + b
    a = np.linalg.inv(reference.direction @ np.diag(reference.spacing)) @ (mask.direction @ np.diag(mask.spacing))
    b = reference.patient_to_index(mask.origin)
    out = np.zeros(reference.shape, bool)
    if (
        np.allclose(a, np.rint(a), atol=tol)
        and np.allclose(b, np.rint(b), atol=tol * 10)
        and np.allclose(np.abs(np.rint(a)).sum(0), 1)
        and np.allclose(np.abs(np.rint(a)).sum(1), 1)
    ):
        kk, jj, ii = np.nonzero(src)
        if kk.size == 0:
            return out
        m_idx = np.stack([ii, jj, kk], 1)
        r_idx = (m_idx @ np.rint(a).T.astype(int)) + np.rint(b).astype(int)
        ni, nj, nk = reference.size_ijk
        ok = (
            (r_idx[:, 0] >= 0)
            & (r_idx[:, 0] < ni)
            & (r_idx[:, 1] >= 0)
            & (r_idx[:, 1] < nj)
            & (r_idx[:, 2] >= 0)
            & (r_idx[:, 2] < nk)
        )
        r = r_idx[ok]
        out[r[:, 2], r[:, 1], r[:, 0]] = True
        return out
    img = Volume(src.astype(np.uint8), mask.origin, mask.spacing, mask.direction).to_sitk()
    res = sitk.Resample(img, reference.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(res) > 0
