"""The registration result shared by all engines: affine + dense displacement on a working grid, in LPS mm.

Follow-up point ``y`` (fixed) → baseline point (moving)::

    phi(y) = M @ (y + u(y)) + m

``u`` and its inverse ``v`` (``y = z + v(z)`` for ``z = M⁻¹(x - m)``) are stored as world-mm vectors on the
working grid and interpolated trilinearly (clamped at the grid border). Images and label maps are pulled with
SimpleITK through the equivalent composite transform; ``save_field`` writes the total displacement
``phi(y) - y`` as an ITK/NIfTI vector image that ``sitk.DisplacementFieldTransform`` can use directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.registration.base import RegistrationQuality
from lesiontrack.models.registration.grids import affine_transform, placeholder_like

Array = np.ndarray

MAX_ONE_HOT_LABELS = 64


def _sample_field(field_kji3: Array, grid: Volume, points: Array) -> Array:
    """Trilinear sample of a ``(3, K, J, I)`` field at LPS points ``(N, 3)`` (border-clamped)."""
    idx = grid.patient_to_index(points)  # (N, 3) in i, j, k
    coords = np.stack([idx[:, 2], idx[:, 1], idx[:, 0]])
    return np.stack(
        [ndimage.map_coordinates(field_kji3[c], coords, order=1, mode="nearest", prefilter=False) for c in range(3)],
        axis=1,
    ).astype(np.float64)


@dataclass
class DisplacementFieldRegistration:
    """Affine + dense displacement result (implements :class:`models.registration.base.Registration`)."""

    baseline_grid: Volume
    followup_grid: Volume
    field_grid: Volume  # geometry of ``u`` / ``v``
    matrix: Array  # M (3×3)
    offset: Array  # m (3)
    forward: Array  # u: (3, K, J, I) float32, world mm, follow-up frame (pre-affine)
    inverse: Array  # v: (3, K, J, I) float32, world mm
    engine: str = "convex"
    quality: RegistrationQuality = field(default_factory=RegistrationQuality)

    def __post_init__(self) -> None:
        self.baseline_grid = placeholder_like(self.baseline_grid)
        self.followup_grid = placeholder_like(self.followup_grid)
        self.field_grid = placeholder_like(self.field_grid)
        self.matrix = np.asarray(self.matrix, dtype=np.float64).reshape(3, 3)
        self.offset = np.asarray(self.offset, dtype=np.float64).reshape(3)
        expected = (3, *self.field_grid.shape)
        for name in ("forward", "inverse"):
            arr = getattr(self, name)
            if arr.shape != expected:
                raise ValueError(f"{name} field shape {arr.shape} != {expected}")

    # -- points ------------------------------------------------------------------------------------
    def map_points_to_baseline(self, points_mm: Array) -> Array:
        """Follow-up LPS mm (N, 3) → baseline LPS mm (N, 3)."""
        y = np.atleast_2d(np.asarray(points_mm, dtype=np.float64))
        if y.size == 0:
            return y.reshape(0, 3)
        return (y + _sample_field(self.forward, self.field_grid, y)) @ self.matrix.T + self.offset

    def map_points_to_followup(self, points_mm: Array, tol_mm: float = 1e-4, max_iter: int = 50) -> Array:
        """Baseline LPS mm (N, 3) → follow-up LPS mm (N, 3): the inverse of :meth:`map_points_to_baseline`.

        Starts from the stored inverse field and refines by fixed-point iteration ``y = z - u(y)``.
        """
        x = np.atleast_2d(np.asarray(points_mm, dtype=np.float64))
        if x.size == 0:
            return x.reshape(0, 3)
        z = (x - self.offset) @ np.linalg.inv(self.matrix).T
        y = z + _sample_field(self.inverse, self.field_grid, z)
        for _ in range(max_iter):
            y_new = z - _sample_field(self.forward, self.field_grid, y)
            step = float(np.max(np.abs(y_new - y)))
            y = y_new
            if step < tol_mm:
                break
        return y

    # -- SimpleITK bridge --------------------------------------------------------------------------
    def _displacement_transform(self) -> sitk.Transform:
        vec = np.ascontiguousarray(np.moveaxis(self.forward, 0, -1).astype(np.float64))
        img = sitk.GetImageFromArray(vec, isVector=True)
        img.SetOrigin(tuple(float(v) for v in self.field_grid.origin))
        img.SetSpacing(tuple(float(v) for v in self.field_grid.spacing))
        img.SetDirection(tuple(float(v) for v in self.field_grid.direction.reshape(-1)))
        return sitk.DisplacementFieldTransform(img)

    def to_sitk_transform(self) -> sitk.Transform:
        """Composite transform follow-up point → baseline point (as SimpleITK's resampling expects)."""
        comp = sitk.CompositeTransform(3)
        comp.AddTransform(affine_transform(self.matrix, self.offset))
        comp.AddTransform(self._displacement_transform())  # applied first (ITK applies the stack back to front)
        return comp

    def total_displacement(self) -> Volume:
        """``phi(y) - y`` on the field grid as a ``(K, J, I, 3)`` float32 LPS-mm vector volume."""
        ni, nj, nk = self.field_grid.size_ijk
        k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
        y = self.field_grid.index_to_patient(np.stack([i, j, k], -1).astype(np.float64))
        yu = y + np.moveaxis(self.forward, 0, -1)
        disp = yu @ self.matrix.T + self.offset - y
        return Volume(
            disp.astype(np.float32)[..., 0],
            self.field_grid.origin,
            self.field_grid.spacing,
            self.field_grid.direction,
            {"vector": disp.astype(np.float32)},
        )

    def save_field(self, path: str | Path) -> Path:
        """Write ``phi(y) - y`` (LPS mm, ITK convention: fixed = follow-up) as a NIfTI/NRRD/MHA vector image."""
        path = Path(path)
        disp = self.total_displacement().meta["vector"]
        img = sitk.GetImageFromArray(disp.astype(np.float32), isVector=True)
        img.SetOrigin(tuple(float(v) for v in self.field_grid.origin))
        img.SetSpacing(tuple(float(v) for v in self.field_grid.spacing))
        img.SetDirection(tuple(float(v) for v in self.field_grid.direction.reshape(-1)))
        sitk.WriteImage(img, str(path), useCompression=True)
        return path

    # -- images and labels --------------------------------------------------------------------------
    def warp_image(self, baseline_image: Volume, default: float = -1024.0) -> Volume:
        """Pull a baseline-space image onto the follow-up grid (trilinear; integer images are rounded)."""
        src = baseline_image.to_sitk()
        if src.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
            src = sitk.Cast(src, sitk.sitkFloat32)
        ref = _reference(self.followup_grid)
        out = sitk.GetArrayFromImage(
            sitk.Resample(src, ref, self.to_sitk_transform(), sitk.sitkLinear, float(default), src.GetPixelID())
        )
        if np.issubdtype(baseline_image.array.dtype, np.integer):
            info = np.iinfo(baseline_image.array.dtype)
            out = np.clip(np.rint(out), info.min, info.max).astype(baseline_image.array.dtype)
        return Volume(
            out,
            self.followup_grid.origin.copy(),
            self.followup_grid.spacing.copy(),
            self.followup_grid.direction.copy(),
            dict(baseline_image.meta),
        )

    def warp_labels(self, baseline_labels: Volume, margin_mm: float = 6.0) -> Volume:
        """Pull a baseline label map onto the follow-up grid without mixing labels.

        Each label's indicator is resampled linearly and every voxel takes the most probable label (background
        probability = 1 - sum of the others): smooth boundaries, never a value between two labels. Work is
        restricted to the region the labels map to. More than ``MAX_ONE_HOT_LABELS`` labels: nearest neighbour.
        """
        arr = np.asarray(baseline_labels.array)
        out_dtype = arr.dtype if np.issubdtype(arr.dtype, np.integer) else np.int32
        fg = self.followup_grid
        out = np.zeros(fg.shape, dtype=out_dtype)
        labels = [int(v) for v in np.unique(arr) if v != 0]
        if not labels:
            return Volume(out, fg.origin.copy(), fg.spacing.copy(), fg.direction.copy(), dict(baseline_labels.meta))
        if len(labels) > MAX_ONE_HOT_LABELS:
            src = sitk.Cast(baseline_labels.to_sitk(), sitk.sitkUInt32)
            res = sitk.Resample(
                src, _reference(fg), self.to_sitk_transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt32
            )
            out[:] = sitk.GetArrayFromImage(res).astype(out_dtype)
            return Volume(out, fg.origin.copy(), fg.spacing.copy(), fg.direction.copy(), dict(baseline_labels.meta))
        lo_b, hi_b = _bbox(arr != 0, pad=2)
        roi = self._followup_roi(baseline_labels, arr != 0, margin_mm)
        if roi is None:
            return Volume(out, fg.origin.copy(), fg.spacing.copy(), fg.direction.copy(), dict(baseline_labels.meta))
        (k0, j0, i0), (k1, j1, i1) = roi
        sub = Volume(
            np.broadcast_to(np.zeros((), np.uint8), (k1 - k0, j1 - j0, i1 - i0)),
            fg.index_to_patient(np.array([i0, j0, k0], dtype=np.float64)),
            fg.spacing,
            fg.direction,
        )
        crop = arr[lo_b[0] : hi_b[0], lo_b[1] : hi_b[1], lo_b[2] : hi_b[2]]
        crop_origin = baseline_labels.index_to_patient(np.array([lo_b[2], lo_b[1], lo_b[0]], dtype=np.float64))
        transform = self.to_sitk_transform()
        ref = _reference(sub)
        best_p = np.zeros(sub.shape, np.float32)
        best_l = np.zeros(sub.shape, out_dtype)
        sum_p = np.zeros(sub.shape, np.float32)
        for lab in labels:
            ind = Volume(
                (crop == lab).astype(np.float32), crop_origin, baseline_labels.spacing, baseline_labels.direction
            ).to_sitk()
            p = sitk.GetArrayFromImage(sitk.Resample(ind, ref, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
            sum_p += p
            better = p > best_p
            best_p[better] = p[better]
            best_l[better] = lab
        keep = best_p > np.maximum(1.0 - sum_p, 0.0)
        out[k0:k1, j0:j1, i0:i1] = np.where(keep, best_l, 0)
        return Volume(out, fg.origin.copy(), fg.spacing.copy(), fg.direction.copy(), dict(baseline_labels.meta))

    def _followup_roi(
        self, labels: Volume, mask: Array, margin_mm: float
    ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """Index box (k, j, i) on the follow-up grid containing the mapped label voxels (+ margin)."""
        idx = np.argwhere(mask)
        if len(idx) > 20000:
            idx = idx[np.linspace(0, len(idx) - 1, 20000).astype(int)]
        # add the 8 corners of the label's bounding box so thin structures are covered
        lo, hi = idx.min(0), idx.max(0)
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        idx = np.vstack([idx, corners])
        pts = labels.index_to_patient(idx[:, ::-1].astype(np.float64))
        y = self.map_points_to_followup(pts)
        fidx = self.followup_grid.patient_to_index(y)[:, ::-1]  # k, j, i
        vox = labels.spacing.max() + margin_mm
        pad = np.ceil(vox / self.followup_grid.spacing[::-1]).astype(int) + 1
        shape = np.array(self.followup_grid.shape)
        lo = np.maximum(np.floor(fidx.min(0)).astype(int) - pad, 0)
        hi = np.minimum(np.ceil(fidx.max(0)).astype(int) + pad + 1, shape)
        if np.any(hi <= lo):
            return None
        return tuple(int(v) for v in lo), tuple(int(v) for v in hi)


def _bbox(mask: Array, pad: int) -> tuple[Array, Array]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, np.array(mask.shape))
    return lo, hi


def _reference(grid: Volume) -> sitk.Image:
    ref = sitk.Image([int(v) for v in grid.size_ijk], sitk.sitkUInt8)
    ref.SetOrigin(tuple(float(v) for v in grid.origin))
    ref.SetSpacing(tuple(float(v) for v in grid.spacing))
    ref.SetDirection(tuple(float(v) for v in grid.direction.reshape(-1)))
    return ref


def jacobian_stats(forward_vox: np.ndarray) -> tuple[float, float]:
    """(fraction of voxels with det J ≤ 0, std of log J) of ``x + u`` for ``u`` (3, K, J, I) in voxel units
    ordered (i, j, k) on an isotropic grid."""
    g = [np.gradient(forward_vox[c], axis=(2, 1, 0)) for c in range(3)]  # d/di, d/dj, d/dk of each component
    j = np.empty((3, 3, *forward_vox.shape[1:]), np.float32)
    for c in range(3):
        for a in range(3):
            j[c, a] = g[c][a] + (1.0 if a == c else 0.0)
    det = (
        j[0, 0] * (j[1, 1] * j[2, 2] - j[1, 2] * j[2, 1])
        - j[0, 1] * (j[1, 0] * j[2, 2] - j[1, 2] * j[2, 0])
        + j[0, 2] * (j[1, 0] * j[2, 1] - j[1, 1] * j[2, 0])
    )
    fold = float(np.mean(det <= 0))
    pos = det[det > 0]
    return fold, float(np.std(np.log(pos))) if pos.size else float("nan")
