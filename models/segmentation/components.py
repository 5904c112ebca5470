"""Connected-component helpers used after segmentation (LinGuinE's filtering and mask centre).

* :func:`mask_centre_index` — the voxel deepest inside a mask (max distance to the boundary), LinGuinE's
  ``find_mask_center``: unlike the centroid it always lies inside the lesion, even for C-shaped masks.
* :func:`keep_nearest_component` — keep only the connected component containing, or nearest to, a point
  (within ``max_distance_mm``), LinGuinE's ``filter_prediction`` in millimetres.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from lesiontrack.models.imaging.volume import Volume


def mask_centre_index(mask: np.ndarray, spacing_kji: np.ndarray | None = None) -> np.ndarray | None:
    """``(k, j, i)`` of the voxel with maximal distance to the background; None for an empty mask."""
    full = mask > 0
    if not full.any():
        return None
    lo, hi = bbox(full)
    m = full[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    dist = ndi.distance_transform_edt(np.pad(m, 1), sampling=spacing_kji)[1:-1, 1:-1, 1:-1]
    best = np.flatnonzero(dist.ravel() >= dist.max() - 1e-6)
    return np.array(np.unravel_index(int(best[len(best) // 2]), m.shape)) + lo


def bbox(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box (lo, hi exclusive) of a non-empty boolean array, via per-axis projections (fast)."""
    lo, hi = [], []
    for ax in range(m.ndim):
        proj = np.flatnonzero(m.any(axis=tuple(a for a in range(m.ndim) if a != ax)))
        lo.append(proj[0])
        hi.append(proj[-1] + 1)
    return np.array(lo), np.array(hi)


def mask_centre_mm(mask: Volume) -> np.ndarray | None:
    """LPS mm of :func:`mask_centre_index`."""
    kji = mask_centre_index(mask.array, mask.spacing[::-1])
    return None if kji is None else mask.index_to_patient(kji[::-1].astype(float))


def centroid_mm(mask: Volume) -> np.ndarray | None:
    idx = np.argwhere(mask.array > 0)
    return None if idx.size == 0 else mask.index_to_patient(idx[:, ::-1].mean(0))


def keep_nearest_component(mask: Volume, point_mm: np.ndarray, max_distance_mm: float = 10.0) -> Volume:
    """Keep the component containing ``point_mm``, else the nearest one within ``max_distance_mm``, else none."""
    full = mask.array > 0
    out = np.zeros(mask.shape, np.uint8)
    if not full.any():
        return mask.with_array(out)
    lo, hi = bbox(full)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    labels, _n = ndi.label(full[sl], structure=ndi.generate_binary_structure(3, 1))
    idx = np.argwhere(labels > 0)
    pts = mask.index_to_patient((idx + lo)[:, ::-1].astype(float))
    d = np.linalg.norm(pts - np.asarray(point_mm, float), axis=1)
    nearest = int(np.argmin(d))
    if d[nearest] <= max_distance_mm:
        out[sl] = labels == labels[tuple(idx[nearest])]
    return mask.with_array(out)


def largest_component(arr: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(arr > 0)
    if n <= 1:
        return arr > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def connected_to(cand: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """The connected components of boolean ``cand`` that ``anchor`` touches."""
    lab, n = ndi.label(cand)
    if n == 0:
        return np.zeros_like(cand)
    keep = np.unique(lab[anchor & cand])
    return np.isin(lab, keep[keep > 0])


def dilate_mm(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """``mask`` grown by ``radius_mm`` (Euclidean, voxel ``spacing`` in mm)."""
    return np.asarray(ndi.distance_transform_edt(~mask, sampling=spacing) <= radius_mm)
