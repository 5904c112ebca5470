"""Stages every engine shares: working grid + robust affine + resampling before, result assembly after.

``prepare`` builds the follow-up and the affinely pre-aligned baseline on the working grid (with the mask of
voxels both scans cover); ``build_result`` turns a working-grid displacement (voxel units, (i, j, k)
components) into a :class:`DisplacementFieldRegistration` with its quality report.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.registration.base import RegistrationQuality
from lesiontrack.models.registration.features import identity_ijk, sample
from lesiontrack.models.registration.field import DisplacementFieldRegistration, jacobian_stats
from lesiontrack.models.registration.grids import (
    body_mask,
    followup_index_map,
    fov_index,
    fov_mask,
    resample,
    resample_index,
    to_float_sitk,
    working_grid,
)
from lesiontrack.models.registration.initial import robust_affine

log = logging.getLogger(__name__)

Array = np.ndarray


@dataclass
class Prepared:
    baseline: Volume
    followup: Volume
    grid: Volume  # working grid (geometry)
    matrix: Array
    offset: Array
    init_method: str
    fixed: Array  # follow-up on the working grid (HU, float32)
    moving: Array  # baseline through the affine on the working grid
    valid: Array  # both scans cover the voxel
    valid_core: Array  # ``valid`` eroded (feature support fully inside)
    baseline_sitk: sitk.Image  # anti-aliased float baseline (reused for the "before" similarity)


def prepare(
    baseline: Volume, followup: Volume, spacing_mm: float, affine: bool, timings: dict[str, float], erode_vox: int = 3
) -> Prepared:
    _check_volume(baseline, "baseline")
    _check_volume(followup, "follow-up")
    grid = working_grid(followup, spacing_mm, multiple=4)
    t = time.perf_counter()
    d = followup.direction
    n = np.array(grid.size_ijk, dtype=np.float64)
    binv = np.linalg.inv(baseline.direction @ np.diag(baseline.spacing))
    if affine:
        init = robust_affine(baseline, followup)
        matrix, offset, method = init.matrix, init.offset, init.method
        # working index q → baseline index, from origin-free quantities only (see AffineInit)
        ba = binv @ matrix @ d * spacing_mm
        bb = binv @ (
            matrix @ d @ (-spacing_mm * (n - 1) / 2) + (init.anchor_origin - baseline.origin) + init.anchor_rel
        )
    else:
        matrix, offset, method = np.eye(3), np.zeros(3), "identity"
        ba = binv @ d * spacing_mm
        bb = binv @ (grid.origin - baseline.origin)
    timings["affine"] = time.perf_counter() - t
    t = time.perf_counter()
    fa, fb = followup_index_map(followup, grid)
    fimg = resample_index(followup, fa, fb, grid.shape, target_spacing_mm=spacing_mm)
    bimg = resample_index(baseline, ba, bb, grid.shape, target_spacing_mm=spacing_mm)
    valid = fov_index(followup.size_ijk, fa, fb, grid.shape) & fov_index(baseline.size_ijk, ba, bb, grid.shape)
    if not valid.any():
        raise ValueError("baseline and follow-up do not overlap after initial alignment")
    core = ndimage.binary_erosion(valid, iterations=erode_vox, border_value=1) if erode_vox > 0 else valid
    timings["resample"] = time.perf_counter() - t
    return Prepared(
        baseline,
        followup,
        grid,
        matrix,
        offset,
        method,
        fimg.astype(np.float32),
        bimg.astype(np.float32),
        valid,
        core,
        to_float_sitk(baseline, spacing_mm),
    )


def _check_volume(volume: Volume, what: str) -> None:
    if min(volume.shape) < 2:
        raise ValueError(f"{what} volume is too small to register: shape {volume.shape}")
    if not np.isfinite(np.asarray(volume.array, dtype=np.float32)).all():
        raise ValueError(f"{what} volume contains NaN or infinite values")


def ncc(a: Array, b: Array, mask: Array) -> float:
    if mask.sum() < 10:
        return float("nan")
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum() + 1e-12))


def build_result(
    prep: Prepared,
    u_vox: Array,
    v_vox: Array,
    engine: str,
    device: str,
    timings: dict[str, float],
    t_start: float,
    extra: dict[str, object] | None = None,
) -> DisplacementFieldRegistration:
    """Assemble the result from forward/inverse displacements in working-voxel units ((3, K, J, I), i/j/k)."""
    t = time.perf_counter()
    grid = prep.grid
    with torch.no_grad():
        mov = torch.from_numpy(prep.moving)[None, None]
        u_t = torch.from_numpy(np.ascontiguousarray(u_vox, dtype=np.float32))
        ident = identity_ijk(tuple(prep.moving.shape), torch.device("cpu"))
        warped = sample(mov, ident + u_t.permute(1, 2, 3, 0))[0, 0].numpy()
    folding, std_logj = jacobian_stats(u_vox)
    rot = grid.direction * grid.spacing[0]
    u_world = np.einsum("ab,bkji->akji", rot, u_vox).astype(np.float32)
    v_world = np.einsum("ab,bkji->akji", rot, v_vox).astype(np.float32)
    body = body_mask(prep.fixed) & prep.valid
    before = resample(prep.baseline_sitk, grid, default=-1024.0)
    before_mask = body & fov_mask(prep.baseline, grid, np.eye(3), np.zeros(3))
    quality = RegistrationQuality(
        similarity_metric="ncc",
        similarity_before=ncc(prep.fixed, before, before_mask),
        similarity_after=ncc(prep.fixed, warped, body),
        folding_fraction=folding,
        device=device,
        extra={
            "std_log_jacobian": std_logj,
            "init": prep.init_method,
            "working_grid": list(grid.size_ijk),
            "working_spacing_mm": float(grid.spacing[0]),
            "affine_matrix": prep.matrix.tolist(),
            "affine_offset": prep.offset.tolist(),
            **(extra or {}),
        },
    )
    timings["finalise"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    quality.stage_seconds = {k: round(v, 3) for k, v in timings.items()}
    log.debug(
        "%s registration done in %.1f s on %s (ncc %.3f -> %.3f, folding %.4f%%)",
        engine,
        timings["total"],
        device,
        quality.similarity_before,
        quality.similarity_after,
        100 * folding,
    )
    return DisplacementFieldRegistration(
        prep.baseline, prep.followup, grid, prep.matrix, prep.offset, u_world, v_world, engine=engine, quality=quality
    )
