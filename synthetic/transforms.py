"""Exact, analytic spatial transforms between a baseline scan and a synthetic follow-up (patient motion).

A :class:`SpatialTransform` is the ground truth of a synthetic follow-up. It maps follow-up LPS points to
baseline LPS points (the direction a registration result also has: fixed = follow-up, moving = baseline)::

    followup_to_baseline(p) = R @ (p - c) + c + t + u(p)

``R`` a rotation about the centre ``c``, ``t`` a translation, and ``u`` a smooth displacement (elastic tissue
motion + breathing) written as a sum of separable Gaussian radial basis functions on a regular LPS lattice, so it
can be evaluated exactly at any point. ``baseline_to_followup`` inverts it by fixed-point iteration (``u`` is kept
far from folding: its Jacobian norm is < 0.5, so the iteration contracts; error < 1e-3 mm after a few steps).

:func:`apply_transform` pulls a baseline volume onto a follow-up grid through the exact mapping (every output
voxel centre is mapped analytically, no displacement-field interpolation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from lesiontrack.models.imaging.volume import Volume

Array = np.ndarray


def rotation_matrix(angles_deg: Array) -> Array:
    """Rotation ``Rz @ Ry @ Rx`` for angles (about L, P, S axes) in degrees."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class SpatialTransform:
    """Follow-up → baseline mapping: rotation about ``center`` + ``translation`` + Gaussian-RBF displacement.

    ``lattice_axes`` are the LPS coordinates (mm) of the RBF centres along x, y and z; ``weights`` has shape
    ``(nx, ny, nz, 3)`` (mm); ``sigma_mm`` the Gaussian width along each axis. With no lattice the transform is rigid.
    """

    rotation: Array = field(default_factory=lambda: np.eye(3))
    center: Array = field(default_factory=lambda: np.zeros(3))
    translation: Array = field(default_factory=lambda: np.zeros(3))
    lattice_axes: tuple[Array, Array, Array] | None = None
    weights: Array | None = None
    sigma_mm: Array = field(default_factory=lambda: np.full(3, 40.0))

    def __post_init__(self) -> None:
        self.rotation = np.asarray(self.rotation, dtype=np.float64).reshape(3, 3)
        self.center = np.asarray(self.center, dtype=np.float64).reshape(3)
        self.translation = np.asarray(self.translation, dtype=np.float64).reshape(3)
        self.sigma_mm = np.asarray(self.sigma_mm, dtype=np.float64).reshape(3)
        if not np.allclose(self.rotation.T @ self.rotation, np.eye(3), atol=1e-6):
            raise ValueError("rotation must be orthonormal")
        if self.lattice_axes is not None:
            ax, ay, az = (np.asarray(a, dtype=np.float64).reshape(-1) for a in self.lattice_axes)
            self.lattice_axes = (ax, ay, az)
            self.weights = np.asarray(self.weights, dtype=np.float64)
            expected = (*tuple(len(a) for a in self.lattice_axes), 3)
            if self.weights.shape != expected:
                raise ValueError(f"weights shape {self.weights.shape} != lattice {expected}")

    # -- evaluation -------------------------------------------------------------------------------
    def displacement(self, pts_mm: Array, chunk: int = 200_000) -> Array:
        """Non-rigid part ``u(p)`` in mm for points ``(..., 3)`` (LPS)."""
        pts = np.asarray(pts_mm, dtype=np.float64)
        shape = pts.shape
        flat = pts.reshape(-1, 3)
        out = np.zeros_like(flat)
        if self.lattice_axes is None or self.weights is None:
            return out.reshape(shape)
        ax, ay, az = self.lattice_axes
        w = self.weights  # (A, B, C, 3)
        a_n, b_n, c_n = w.shape[:3]
        w_c = w.transpose(2, 0, 1, 3).reshape(c_n, a_n * b_n * 3)  # (C, A*B*3)
        for s in range(0, flat.shape[0], chunk):
            p = flat[s : s + chunk]
            gx = np.exp(-0.5 * ((p[:, 0:1] - ax[None]) / self.sigma_mm[0]) ** 2)  # (n, A)
            gy = np.exp(-0.5 * ((p[:, 1:2] - ay[None]) / self.sigma_mm[1]) ** 2)  # (n, B)
            gz = np.exp(-0.5 * ((p[:, 2:3] - az[None]) / self.sigma_mm[2]) ** 2)  # (n, C)
            t = (gz @ w_c).reshape(-1, a_n, b_n, 3)  # sum over c
            t = np.einsum("nabd,nb->nad", t, gy)  # sum over b
            out[s : s + chunk] = np.einsum("nad,na->nd", t, gx)  # sum over a
        return out.reshape(shape)

    def rigid(self, pts_mm: Array) -> Array:
        pts = np.asarray(pts_mm, dtype=np.float64)
        return (pts - self.center) @ self.rotation.T + self.center + self.translation

    def followup_to_baseline(self, pts_mm: Array) -> Array:
        """Map follow-up LPS points ``(..., 3)`` to baseline LPS points (exact)."""
        pts = np.asarray(pts_mm, dtype=np.float64)
        return self.rigid(pts) + self.displacement(pts)

    def baseline_to_followup(self, pts_mm: Array, tol_mm: float = 1e-4, max_iter: int = 100) -> Array:
        """Inverse by fixed-point iteration ``p ← Rᵀ(q − c − t − u(p)) + c``; error below ``tol_mm``."""
        q = np.asarray(pts_mm, dtype=np.float64)
        shape = q.shape
        q = q.reshape(-1, 3)
        base = q - self.center - self.translation
        p = base @ self.rotation + self.center  # rigid inverse as start
        for _ in range(max_iter):
            p_new = (base - self.displacement(p)) @ self.rotation + self.center
            step = float(np.max(np.abs(p_new - p))) if p.size else 0.0
            p = p_new
            if step < tol_mm * 0.1:
                break
        else:  # pragma: no cover - guarded by the Jacobian bound in random_patient_motion
            err = float(np.max(np.linalg.norm(self.followup_to_baseline(p) - q, axis=1)))
            if err > tol_mm:
                raise RuntimeError(f"inverse transform did not converge (residual {err:.3g} mm)")
        return p.reshape(shape)

    def displacement_field(self, grid: Volume) -> Array:
        """Total displacement ``followup_to_baseline(p) - p`` at every voxel of ``grid``: array ``(k, j, i, 3)`` mm."""
        return np.concatenate(
            [
                self.map_grid(grid, k0, min(grid.shape[0], k0 + 16))
                - _grid_points(grid, k_range=(k0, min(grid.shape[0], k0 + 16)))
                for k0 in range(0, grid.shape[0], 16)
            ],
            axis=0,
        ).astype(np.float32)

    def map_grid(self, grid: Volume, k0: int = 0, k1: int | None = None) -> Array:
        """``followup_to_baseline`` of the voxel centres of slices ``k0:k1`` of ``grid``: ``(k, j, i, 3)`` mm.

        Grids whose axes are aligned with LPS (any flips/permutations) use a separable evaluation of the RBF
        field (same values as the pointwise formula, much faster); oblique grids fall back to pointwise.
        """
        k1 = grid.shape[0] if k1 is None else k1
        pts = _grid_points(grid, k_range=(k0, k1))
        out = self.rigid(pts)
        if self.lattice_axes is None or self.weights is None:
            return out
        perm = _axis_permutation(grid.direction)
        if perm is None:
            return out + self.displacement(pts)
        _nk, nj, ni = grid.shape
        counts = (np.arange(ni), np.arange(nj), np.arange(k0, k1))
        gs = []
        for m in range(3):  # index axis i, j, k
            lps = perm[m]
            coord = grid.origin[lps] + grid.direction[lps, m] * grid.spacing[m] * counts[m]
            gs.append(np.exp(-0.5 * ((coord[:, None] - self.lattice_axes[lps][None]) / self.sigma_mm[lps]) ** 2))
        letters = "abc"
        spec = f"abcd,i{letters[perm[0]]},j{letters[perm[1]]},k{letters[perm[2]]}->kjid"
        return out + np.einsum(spec, self.weights, gs[0], gs[1], gs[2], optimize=True)

    # -- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "kind": "rigid+gaussian_rbf",
            "direction": "followup_to_baseline",
            "rotation": self.rotation.tolist(),
            "center": self.center.tolist(),
            "translation": self.translation.tolist(),
            "sigma_mm": self.sigma_mm.tolist(),
        }
        if self.lattice_axes is not None and self.weights is not None:
            d["lattice_axes"] = [a.tolist() for a in self.lattice_axes]
            d["weights"] = self.weights.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpatialTransform:
        axes = d.get("lattice_axes")
        return cls(
            rotation=np.array(d["rotation"]),
            center=np.array(d["center"]),
            translation=np.array(d["translation"]),
            sigma_mm=np.array(d.get("sigma_mm", [40.0] * 3)),
            lattice_axes=(np.array(axes[0]), np.array(axes[1]), np.array(axes[2])) if axes is not None else None,
            weights=np.array(d["weights"]) if axes is not None else None,
        )

    def max_jacobian_norm(self, grid: Volume, stride: int = 4) -> float:
        """Largest spectral norm of ∇u over a strided grid (finite differences, 0.5 mm)."""
        pts = _grid_points(grid, stride=stride).reshape(-1, 3)
        h = 0.5
        jac = np.stack(
            [(self.displacement(pts + h * e) - self.displacement(pts - h * e)) / (2 * h) for e in np.eye(3)], axis=-1
        )
        return float(np.max(np.linalg.norm(jac, ord=2, axis=(1, 2)))) if len(pts) else 0.0


def _axis_permutation(direction: Array) -> list[int] | None:
    """For an LPS-aligned direction matrix, the LPS axis each index axis runs along; else None."""
    perm = [int(np.argmax(np.abs(direction[:, m]))) for m in range(3)]
    if sorted(perm) != [0, 1, 2] or not np.allclose(np.abs(direction[perm, [0, 1, 2]]), 1.0, atol=1e-9):
        return None
    return perm


def _grid_points(grid: Volume, stride: int = 1, k_range: tuple[int, int] | None = None) -> Array:
    nk, nj, ni = grid.shape
    k0, k1 = k_range if k_range is not None else (0, nk)
    k, j, i = np.meshgrid(np.arange(k0, k1, stride), np.arange(0, nj, stride), np.arange(0, ni, stride), indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).astype(np.float64)
    return grid.index_to_patient(ijk)


def random_patient_motion(
    rng: np.random.Generator,
    reference: Volume,
    rotation_deg: float = 4.0,
    translation_mm: float = 10.0,
    elastic_mm: float = 4.0,
    breathing_mm: float = 0.0,
    lattice_mm: float = 50.0,
) -> SpatialTransform:
    """A random repositioning + smooth elastic (and optional breathing) motion around ``reference``'s extent.

    Rotation angles are uniform in ``±rotation_deg`` about each axis (about the volume centre), translation
    uniform in ``±translation_mm`` per axis, the elastic field has its largest displacement ≈ ``elastic_mm``;
    ``breathing_mm`` adds a cranio-caudal diaphragm-like shift largest at the bottom of the volume.
    """
    lo, hi = reference.world_bounds()
    center = 0.5 * (lo + hi)
    rot = rotation_matrix(rng.uniform(-rotation_deg, rotation_deg, 3))
    trans = rng.uniform(-translation_mm, translation_mm, 3)
    margin = lattice_mm
    axes = tuple(np.arange(lo[d] - margin, hi[d] + margin + 1e-6, lattice_mm) for d in range(3))
    if any(len(a) < 2 for a in axes):
        axes = tuple(np.linspace(lo[d] - margin, hi[d] + margin, max(2, len(a))) for d, a in enumerate(axes))
    shape = (*tuple(len(a) for a in axes), 3)
    weights = rng.normal(0.0, 1.0, shape)
    sigma = np.full(3, lattice_mm * 0.8)
    tr = SpatialTransform(rot, center, trans, (axes[0], axes[1], axes[2]), weights, sigma)
    if elastic_mm > 0:
        probe = _grid_points(reference, stride=max(1, min(reference.shape) // 12)).reshape(-1, 3)
        peak = float(np.max(np.linalg.norm(tr.displacement(probe), axis=1))) or 1.0
        tr.weights = weights * (elastic_mm / peak)
    else:
        tr.weights = np.zeros(shape)
    if breathing_mm > 0:
        # Diaphragm-like motion: z-displacement rising towards the caudal end (low S) of the volume, with a
        # small anterior-posterior expansion; added to the lattice weights so it stays one analytic field.
        # divide by the Gaussian partition sum so the lattice weights become displacements in mm
        part = float(
            np.prod([np.sum(np.exp(-0.5 * ((a - a[len(a) // 2]) / sigma[d]) ** 2)) for d, a in enumerate(axes)])
        )
        zs = axes[2]
        ramp = np.clip((hi[2] - zs) / max(hi[2] - lo[2], 1.0), 0.0, 1.2)
        tr.weights[..., 2] += breathing_mm / part * ramp[None, None, :]
        ys = axes[1]
        tr.weights[..., 1] += breathing_mm * 0.25 / part * np.sign(ys - center[1])[None, :, None] * ramp[None, None, :]
    # keep it invertible and well inside the contraction regime of the fixed-point inverse
    jac = tr.max_jacobian_norm(reference, stride=max(1, min(reference.shape) // 10))
    if jac > 0.4:
        tr.weights = tr.weights * (0.4 / jac)
    return tr


def apply_transform(
    baseline: Volume,
    transform: SpatialTransform,
    followup_grid: Volume,
    *,
    label: bool = False,
    default: float | None = None,
    slab: int = 8,
) -> Volume:
    """Resample ``baseline`` onto ``followup_grid`` through ``transform`` (follow-up voxel → baseline point).

    Images use trilinear interpolation (result cast back to the input dtype, rounded for integers), label maps
    nearest neighbour. Voxels mapping outside the baseline get ``default`` (air, -1024 HU, for images; 0 for labels).
    """
    if default is None:
        default = 0.0 if label else -1024.0
    src = baseline.array if label else baseline.array.astype(np.float32, copy=False)
    nk = followup_grid.shape[0]
    out = np.empty(followup_grid.shape, dtype=baseline.array.dtype)
    for k0 in range(0, nk, slab):
        k1 = min(nk, k0 + slab)
        pts_b = transform.map_grid(followup_grid, k0, k1)
        idx = baseline.patient_to_index(pts_b)  # (..., 3) in i, j, k
        coords = np.stack([idx[..., 2], idx[..., 1], idx[..., 0]], axis=0)
        vals = ndimage.map_coordinates(
            src, coords, order=0 if label else 1, mode="constant", cval=default, prefilter=False
        )
        if not label and np.issubdtype(out.dtype, np.integer):
            vals = np.rint(vals)
        out[k0:k1] = vals.astype(out.dtype)
    return Volume(
        out,
        followup_grid.origin.copy(),
        followup_grid.spacing.copy(),
        followup_grid.direction.copy(),
        dict(followup_grid.meta),
    )
