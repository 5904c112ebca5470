"""Turn any prompt (points, box, mask) into a dense 0/1 mask on a target CT grid.

Points become balls of ``point_radius_mm`` (LesionLocator encodes clicks as radius-5 voxel balls), boxes become
the voxels whose centres lie inside the LPS box, masks are resampled (nearest label) onto the grid.
"""

from __future__ import annotations

import numpy as np

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.prompts import Prompt, PromptKind


def prompt_to_mask(prompt: Prompt, grid: Volume, *, point_radius_mm: float = 5.0) -> Volume:
    """Dense uint8 mask of ``prompt`` on ``grid``'s geometry."""
    out = np.zeros(grid.shape, np.uint8)
    if prompt.kind is PromptKind.MASK:
        if prompt.mask is None:
            raise ValueError(f"{prompt.identity.tracking_id}: a mask prompt without a mask")
        m = prompt.mask
        if m.same_grid(grid):
            out = (m.array > 0).astype(np.uint8)
        else:
            src = m.with_array((m.array > 0).astype(np.uint8))
            out = (src.resample_to(grid, label=True).array > 0).astype(np.uint8)
        return _wrap(grid, out)
    if prompt.kind is PromptKind.BOX:
        if prompt.box_mm is None:
            raise ValueError(f"{prompt.identity.tracking_id}: a box prompt without box_mm")
        lo, hi = (np.asarray(c, float) for c in prompt.box_mm)
        lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        ijk = grid.patient_to_index(corners)
        a = np.clip(np.floor(ijk.min(0)).astype(int) - 1, 0, np.array(grid.size_ijk) - 1)
        b = np.clip(np.ceil(ijk.max(0)).astype(int) + 1, 0, np.array(grid.size_ijk) - 1)
        kk, jj, ii = np.mgrid[a[2] : b[2] + 1, a[1] : b[1] + 1, a[0] : b[0] + 1]
        pts = grid.index_to_patient(np.stack([ii, jj, kk], -1).reshape(-1, 3).astype(float))
        tol = 1e-6  # voxel centres inside the box (inclusive)
        inside = np.all((pts >= lo - tol) & (pts <= hi + tol), axis=1).reshape(ii.shape)
        out[a[2] : b[2] + 1, a[1] : b[1] + 1, a[0] : b[0] + 1] = inside
        if not out.any():  # box thinner than a voxel: take the voxel nearest its centre
            _set_nearest(out, grid, (lo + hi) / 2)
        return _wrap(grid, out)
    if prompt.points_mm is None:
        raise ValueError(f"{prompt.identity.tracking_id}: a {prompt.kind.value} prompt without points_mm")
    for p in prompt.points_mm:
        _paint_ball(out, grid, p, point_radius_mm)
    return _wrap(grid, out)


def _wrap(grid: Volume, arr: np.ndarray) -> Volume:
    return Volume(arr, grid.origin.copy(), grid.spacing.copy(), grid.direction.copy())


def _set_nearest(out: np.ndarray, grid: Volume, p_mm: np.ndarray) -> None:
    ijk = np.rint(grid.patient_to_index(p_mm)).astype(int)
    if np.all(ijk >= 0) and np.all(ijk < np.array(grid.size_ijk)):
        out[ijk[2], ijk[1], ijk[0]] = 1


def _paint_ball(out: np.ndarray, grid: Volume, p_mm: np.ndarray, radius_mm: float) -> None:
    centre = grid.patient_to_index(np.asarray(p_mm, float))
    r_vox = radius_mm / grid.spacing
    a = np.clip(np.floor(centre - r_vox).astype(int), 0, np.array(grid.size_ijk) - 1)
    b = np.clip(np.ceil(centre + r_vox).astype(int), 0, np.array(grid.size_ijk) - 1)
    kk, jj, ii = np.mgrid[a[2] : b[2] + 1, a[1] : b[1] + 1, a[0] : b[0] + 1]
    pts = grid.index_to_patient(np.stack([ii, jj, kk], -1).reshape(-1, 3).astype(float))
    inside = (np.linalg.norm(pts - np.asarray(p_mm, float), axis=1) <= radius_mm).reshape(ii.shape)
    sub = out[a[2] : b[2] + 1, a[1] : b[1] + 1, a[0] : b[0] + 1]
    sub |= inside.astype(np.uint8)
    if not out.any():
        _set_nearest(out, grid, np.asarray(p_mm, float))
