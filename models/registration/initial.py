"""Robust affine initialisation: follow-up LPS point ``y`` → baseline LPS point ``M @ y + m``.

1. Translation search by masked normalised cross-correlation (FFT, Padfield 2012) of 8 mm versions of both
   scans, each masked by its own field of view, so different scan ranges and partial z-overlap are handled
   (the body-mask centre is the fallback when the overlap is too small to correlate).
2. Rigid, then affine refinement by gradient descent on a masked NCC at 8 mm and 4 mm (Adam, PyTorch).

Every quantity the optimiser sees is relative to the follow-up's own grid, so moving the follow-up's origin
moves the result by exactly that shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from skimage.registration._masked_phase_cross_correlation import cross_correlate_masked

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.registration.features import Adam, sample
from lesiontrack.models.registration.grids import (
    body_mask,
    followup_index_map,
    fov_index,
    resample_index,
    working_grid,
)

Array = np.ndarray


@dataclass
class AffineInit:
    """``baseline = matrix @ (y - centre) + anchor_origin + anchor_rel`` for follow-up points ``y``.

    ``anchor_origin`` depends only on the baseline and ``anchor_rel`` only on quantities relative to the
    follow-up's grid, so the pair is bit-identical when only the follow-up's origin changes; ``offset`` is the
    same map in absolute form (``baseline = matrix @ y + offset``).
    """

    matrix: Array
    offset: Array
    centre: Array
    anchor_origin: Array
    anchor_rel: Array
    ncc_before: float
    ncc_after: float
    method: str


def _grid_over(volume: Volume, direction: Array, spacing: float) -> Volume:
    """Grid with ``direction`` and isotropic ``spacing`` covering ``volume``'s voxel-centre bounding box."""
    ni, nj, nk = volume.size_ijk
    corners = np.array([[i, j, k] for i in (0, ni - 1) for j in (0, nj - 1) for k in (0, nk - 1)], float)
    proj = volume.index_to_patient(corners) @ direction  # coordinates along the target axes
    lo, hi = proj.min(0), proj.max(0)
    n = np.maximum(2, np.ceil((hi - lo) / spacing - 1e-6).astype(int) + 1)
    arr = np.broadcast_to(np.zeros((), np.uint8), (int(n[2]), int(n[1]), int(n[0])))
    return Volume(arr, direction @ lo, np.full(3, spacing), direction.copy())


def _masked_translation(
    fix: Array, fmask: Array, mov: Array, mmask: Array, overlap_ratio: float
) -> tuple[Array, float] | None:
    """Integer shift ``s`` (k, j, i) maximising masked NCC of ``fix[p]`` vs ``mov[p + s]``; None if no overlap."""
    xc = cross_correlate_masked(fix, mov, fmask, mmask, mode="full", axes=(0, 1, 2), overlap_ratio=overlap_ratio)
    xc = np.nan_to_num(np.real(xc), nan=-1.0)
    peak = np.unravel_index(int(np.argmax(xc)), xc.shape)
    if xc[peak] <= 0:
        return None
    # full mode: index p corresponds to fix shifted against mov by (mov.shape - 1 - p)
    shift = np.array(mov.shape) - 1 - np.array(peak)
    return shift.astype(np.float64), float(xc[peak])


def _rotation(w: torch.Tensor) -> torch.Tensor:
    z = torch.zeros((), dtype=w.dtype)
    skew = torch.stack([torch.stack([z, -w[2], w[1]]), torch.stack([w[2], z, -w[0]]), torch.stack([-w[1], w[0], z])])
    return torch.linalg.matrix_exp(skew)


def _weighted_ncc(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    ws = w.sum().clamp(min=1e-6)
    ma = (w * a).sum() / ws
    mb = (w * b).sum() / ws
    da, db = a - ma, b - mb
    cov = (w * da * db).sum() / ws
    va = (w * da * da).sum() / ws
    vb = (w * db * db).sum() / ws
    return cov / torch.sqrt(va * vb + 1e-8)


def _norm(x: Array) -> Array:
    return np.clip(x, -1000.0, 1000.0) / 1000.0


class _Level:
    """Follow-up and baseline at one resolution: follow-up sample points (inside its body, relative to the
    working-grid centre) and the baseline as a tensor, with the index maps between them."""

    def __init__(self, baseline: Volume, followup: Volume, spacing: float, max_points: int = 40000) -> None:
        self.spacing = spacing
        self.fgrid = working_grid(followup, spacing, multiple=1)
        self.bgrid = _grid_over(baseline, followup.direction, spacing)
        fa, fb = followup_index_map(followup, self.fgrid)
        self.f_np = resample_index(followup, fa, fb, self.fgrid.shape, target_spacing_mm=spacing)
        self.fvalid = fov_index(followup.size_ijk, fa, fb, self.fgrid.shape)
        binv_full = np.linalg.inv(baseline.direction @ np.diag(baseline.spacing))
        ba = binv_full @ followup.direction * spacing
        bb = binv_full @ (self.bgrid.origin - baseline.origin)
        self.b_np = resample_index(baseline, ba, bb, self.bgrid.shape, target_spacing_mm=spacing)
        self.bvalid = fov_index(baseline.size_ijk, ba, bb, self.bgrid.shape)
        body = body_mask(self.f_np)
        w = ndimage.binary_dilation(body, iterations=2) & self.fvalid if body.any() else self.fvalid
        pts = np.argwhere(w)  # k, j, i
        if len(pts) > max_points:  # a regular subset is plenty for 12 parameters
            pts = pts[np.linspace(0, len(pts) - 1, max_points).astype(np.int64)]
        n = np.array(self.fgrid.size_ijk, dtype=np.float64)
        # follow-up voxel positions relative to the centre, in the follow-up's axes (mm): exact, origin-free
        rel_axes = spacing * (pts[:, ::-1].astype(np.float64) - (n - 1) / 2)
        self.yr_axes = torch.from_numpy(rel_axes).float()  # (N, 3), multiply by direction for LPS
        self.f = torch.from_numpy(_norm(self.f_np[tuple(pts.T)]).astype(np.float32))
        self.b = torch.from_numpy(np.stack([_norm(self.b_np), self.bvalid.astype(np.float32)]))[None].float()
        self.binv = np.linalg.inv(self.bgrid.direction @ np.diag(self.bgrid.spacing))
        self.direction = followup.direction

    def ncc(self, matrix: torch.Tensor, const_idx: torch.Tensor) -> torch.Tensor:
        """NCC of the follow-up with the baseline sampled at ``binv @ matrix @ D @ yr_axes + const_idx``."""
        lin = torch.from_numpy(self.binv).float() @ matrix @ torch.from_numpy(self.direction).float()
        idx = self.yr_axes @ lin.T + const_idx
        s = sample(self.b, idx.view(-1, 1, 1, 3), padding="zeros")[0, :, :, 0, 0]
        return _weighted_ncc(self.f, s[0], s[1])


def robust_affine(
    baseline: Volume,
    followup: Volume,
    *,
    affine: bool = True,
    iterations: tuple[int, int] = (40, 40),
    overlap_ratio: float = 0.25,
    fine_spacing_mm: float = 5.0,
) -> AffineInit:
    """Follow-up → baseline affine by FOV-masked translation search, then rigid (8 mm) and affine (fine) descent.

    The rotation centre is the centre of the follow-up's extent (the working-grid centre).
    """
    d = followup.direction
    centre_rel = 0.5 * followup.spacing * (np.array(followup.size_ijk, dtype=np.float64) - 1)
    centre = followup.origin + d @ centre_rel
    coarse = _Level(baseline, followup, 8.0)
    start8 = np.asarray(coarse.fgrid.meta["start_rel"])
    # --- 1. translation: masked NCC over all shifts -------------------------------------------------------------
    found = _masked_translation(coarse.f_np, coarse.fvalid, coarse.b_np, coarse.bvalid, overlap_ratio)
    anchor_origin = coarse.bgrid.origin.copy()
    if found is not None:
        shift_ijk = found[0][::-1]
        # follow-up level voxel p ↔ baseline level voxel p + s; the centre maps to anchor_origin + anchor_rel
        anchor_rel = d @ (centre_rel - start8 + 8.0 * shift_ijk)
        method = "masked-ncc-translation"
    else:
        fb, bb = body_mask(coarse.f_np), body_mask(coarse.b_np)
        mf = np.argwhere(fb)[:, ::-1].mean(0) if fb.any() else (np.array(coarse.fgrid.size_ijk) - 1) / 2
        mb = np.argwhere(bb)[:, ::-1].mean(0) if bb.any() else (np.array(coarse.bgrid.size_ijk) - 1) / 2
        anchor_rel = d @ (8.0 * mb + centre_rel - start8 - 8.0 * mf)
        method = "body-centre"

    w = torch.zeros(3, dtype=torch.float32, requires_grad=True)
    delta = torch.zeros(3, dtype=torch.float32, requires_grad=True)
    g = torch.zeros(3, 3, dtype=torch.float32, requires_grad=True)
    eye = torch.eye(3)

    def const_for(level: _Level, dl: torch.Tensor) -> torch.Tensor:
        base = torch.from_numpy(level.binv @ ((anchor_origin - level.bgrid.origin) + anchor_rel)).float()
        return base + torch.from_numpy(level.binv).float() @ dl

    def matrix() -> torch.Tensor:
        return _rotation(w) @ (eye + g)

    with torch.no_grad():
        ncc_before = float(coarse.ncc(eye, const_for(coarse, torch.zeros(3))))
    fine = _Level(baseline, followup, fine_spacing_mm)
    stages = [(coarse, iterations[0], False), (fine, iterations[1], affine)]
    for level, n_iter, use_g in stages:
        groups = [(w, 0.01), (delta, 1.0 if level is coarse else 0.4)]
        if use_g:
            groups.append((g, 0.003))
        opt = Adam(groups)
        for _ in range(n_iter):
            opt.zero_grad()
            loss = -level.ncc(matrix(), const_for(level, delta))
            if use_g:
                loss = loss + 0.1 * (g * g).sum()
            loss.backward()
            opt.step()
    with torch.no_grad():
        mat = matrix().double().numpy()
        ncc_after = float(fine.ncc(matrix(), const_for(fine, delta)))
    rel = anchor_rel + delta.detach().double().numpy()
    offset = anchor_origin + rel - mat @ centre
    return AffineInit(mat, offset, centre, anchor_origin, rel, ncc_before, ncc_after, method)
