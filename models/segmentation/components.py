"""Connected-component helpers used after segmentation (LinGuinE's filtering and mask centre).

* :func:`mask_centre_index` — the voxel deepest inside a mask (max distance to the boundary), LinGuinE's
  ``find_mask_center``: unlike the centroid it always lies inside the lesion, even for C-shaped masks.
* :func:`keep_nearest_component` — keep only the connected component containing, or nearest to, a point
  (within ``max_distance_mm``), LinGuinE's ``filter_prediction`` in millimetres.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from models.imaging.volume import Volume


def mask_centre_index(mask: np.ndarray, spacing_kji: np.ndarray | None = None) -> np.ndarray | None:
    """``(k, j, i)`` of the voxel with maximal distance to the background; None for an empty mask."""
    m = mask > 0
    if not m.any():
        return None
    dist = ndi.distance_transform_edt(np.pad(m, 1), sampling=spacing_kji)[1:-1, 1:-1, 1:-1]
    best = np.flatnonzero(dist.ravel() >= dist.max() - 1e-6)
    return np.array(np.unravel_index(int(best[len(best) // 2]), m.shape))


def mask_centre_mm(mask: Volume) -> np.ndarray | None:
    """LPS mm of :func:`mask_centre_index`."""
    kji = mask_centre_index(mask.array, mask.spacing[::-1])
    return None if kji is None else mask.index_to_patient(kji[::-1].astype(float))


def centroid_mm(mask: Volume) -> np.ndarray | None:
    idx = np.argwhere(mask.array > 0)
    return None if idx.size == 0 else mask.index_to_patient(idx[:, ::-1].mean(0))


def keep_nearest_component(mask: Volume, point_mm: np.ndarray, max_distance_mm: float = 10.0) -> Volume:
    """Keep the component containing ``point_mm``, else the nearest one within ``max_distance_mm``, else none."""
    m = mask.array > 0
    if not m.any():
        return mask.with_array(np.zeros(mask.shape, np.uint8))
    labels, n = ndi.label(m, structure=ndi.generate_binary_structure(3, 1))
    if n == 1:
        keep = 1
    else:
        idx = np.argwhere(labels > 0)
        pts = mask.index_to_patient(idx[:, ::-1].astype(float))
        d = np.linalg.norm(pts - np.asarray(point_mm, float), axis=1)
        nearest = int(np.argmin(d))
        keep = int(labels[tuple(idx[nearest])]) if d[nearest] <= max_distance_mm else 0
    if n == 1:
        idx = np.argwhere(labels > 0)
        pts = mask.index_to_patient(idx[:, ::-1].astype(float))
        if np.min(np.linalg.norm(pts - np.asarray(point_mm, float), axis=1)) > max_distance_mm:
            keep = 0
    return mask.with_array((labels == keep).astype(np.uint8) if keep else np.zeros(mask.shape, np.uint8))


def largest_component(arr: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(arr > 0)
    if n <= 1:
        return arr > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))
