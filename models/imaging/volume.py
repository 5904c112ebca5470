"""The one volume type used everywhere in LesionTrack.

Convention (the only one in the code base):

* ``array`` is indexed ``[k, j, i]`` (slice, row, column) — NumPy/SimpleITK-``GetArrayFromImage`` order.
* ``origin`` is the patient-LPS position (mm) of the centre of voxel ``(i, j, k) = (0, 0, 0)``.
* ``spacing`` is ``(si, sj, sk)`` in mm along the column, row and slice index axes.
* ``direction`` is a 3×3 matrix whose *columns* are the unit LPS directions of the i, j and k axes
  (SimpleITK's direction, row-major flattened in :meth:`to_sitk`).
* Patient position of voxel index ``(i, j, k)``: ``p = origin + direction @ (spacing * (i, j, k))``.

For a DICOM axial series: column ``i`` follows ImageOrientationPatient[0:3], row ``j`` follows
ImageOrientationPatient[3:6], slice ``k`` follows the slice normal, ``origin`` is the first slice's
ImagePositionPatient.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

Array = np.ndarray


@dataclass
class Volume:
    """A 3-D image on a grid in patient LPS millimetres."""

    array: Array
    origin: Array = field(default_factory=lambda: np.zeros(3))
    spacing: Array = field(default_factory=lambda: np.ones(3))
    direction: Array = field(default_factory=lambda: np.eye(3))
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.origin = np.asarray(self.origin, dtype=np.float64).reshape(3)
        self.spacing = np.asarray(self.spacing, dtype=np.float64).reshape(3)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if self.array.ndim != 3:
            raise ValueError(f"Volume needs a 3-D array, got shape {self.array.shape}")
        if np.any(self.spacing <= 0):
            raise ValueError(f"spacing must be positive, got {self.spacing}")
        if not np.allclose(self.direction.T @ self.direction, np.eye(3), atol=1e-4):
            raise ValueError("direction must be orthonormal")

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(nk, nj, ni)``."""
        k, j, i = self.array.shape
        return (k, j, i)

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        """Grid size in index order ``(ni, nj, nk)``."""
        k, j, i = self.array.shape
        return (i, j, k)

    @property
    def index_to_patient_matrix(self) -> Array:
        """4×4 homogeneous matrix mapping ``(i, j, k, 1)`` to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def index_to_patient(self, ijk: Array) -> Array:
        """Continuous voxel indices ``(..., 3)`` in ``(i, j, k)`` order → LPS mm ``(..., 3)``."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ (self.direction @ np.diag(self.spacing)).T + self.origin

    def patient_to_index(self, xyz: Array) -> Array:
        """LPS mm ``(..., 3)`` → continuous voxel indices in ``(i, j, k)`` order."""
        xyz = np.asarray(xyz, dtype=np.float64)
        inv = np.linalg.inv(self.direction @ np.diag(self.spacing))
        return (xyz - self.origin) @ inv.T

    def world_bounds(self) -> tuple[Array, Array]:
        """Axis-aligned LPS bounding box (min, max) of the voxel centres."""
        ni, nj, nk = self.size_ijk
        corners = np.array([[i, j, k] for i in (0, ni - 1) for j in (0, nj - 1) for k in (0, nk - 1)], float)
        pts = self.index_to_patient(corners)
        return pts.min(0), pts.max(0)

    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def with_array(self, array: Array, **meta: object) -> Volume:
        """Same grid, new voxels."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} does not match grid {self.array.shape}")
        return Volume(array, self.origin.copy(), self.spacing.copy(), self.direction.copy(), {**self.meta, **meta})

    def same_grid(self, other: Volume, atol: float = 1e-4) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    # -- SimpleITK bridge -------------------------------------------------------------------------
    def to_sitk(self) -> sitk.Image:
        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        img.SetOrigin(tuple(float(v) for v in self.origin))
        img.SetSpacing(tuple(float(v) for v in self.spacing))
        img.SetDirection(tuple(float(v) for v in self.direction.reshape(-1)))
        return img

    @classmethod
    def from_sitk(cls, image: sitk.Image, meta: Mapping[str, object] | None = None) -> Volume:
        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3-D image, got {image.GetDimension()}-D")
        return cls(
            sitk.GetArrayFromImage(image),
            np.array(image.GetOrigin()),
            np.array(image.GetSpacing()),
            np.array(image.GetDirection()).reshape(3, 3),
            dict(meta or {}),
        )

    @classmethod
    def read(cls, path: str) -> Volume:
        """Read a NIfTI/NRRD/MHA file (SimpleITK converts to LPS)."""
        return cls.from_sitk(sitk.ReadImage(str(path)))

    def write(self, path: str, compress: bool = True) -> None:
        sitk.WriteImage(self.to_sitk(), str(path), useCompression=compress)

    # -- resampling -------------------------------------------------------------------------------
    def resample_to(
        self,
        reference: Volume,
        *,
        label: bool = False,
        default: float | None = None,
        transform: sitk.Transform | None = None,
    ) -> Volume:
        """Resample onto ``reference``'s grid (linear for images, nearest-label for label maps).

        ``transform`` maps reference (output) points to this volume's points, as in SimpleITK.
        """
        if label and transform is None and self.same_grid(reference):
            # the label interpolator smooths even onto its own grid: a nodule two slices thick came back halved
            return Volume(
                self.array.copy(),
                reference.origin.copy(),
                reference.spacing.copy(),
                reference.direction.copy(),
                dict(self.meta),
            )
        if default is None:
            default = 0.0 if label else float(min(-1024.0, float(self.array.min()) if self.array.size else 0.0))
        interp = (
            sitk.sitkLabelGaussian
            if label and _few_labels(self.array)
            else (sitk.sitkNearestNeighbor if label else sitk.sitkLinear)
        )
        src = self.to_sitk()
        if not label and src.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
            src = sitk.Cast(src, sitk.sitkFloat32)
        out = sitk.Resample(src, reference.to_sitk(), transform or sitk.Transform(), interp, default, src.GetPixelID())
        arr = sitk.GetArrayFromImage(out)
        if not label and np.issubdtype(self.array.dtype, np.integer):
            arr = np.rint(arr).astype(self.array.dtype)
        return Volume(
            arr, reference.origin.copy(), reference.spacing.copy(), reference.direction.copy(), dict(self.meta)
        )

    def resample_isotropic(self, spacing_mm: float, *, label: bool = False) -> Volume:
        """Same orientation and extent, isotropic ``spacing_mm`` voxels."""
        extent = self.spacing * (np.array(self.size_ijk) - 1)
        n = np.maximum(1, np.floor(extent / spacing_mm + 1e-6).astype(int) + 1)
        ref = Volume(np.zeros((n[2], n[1], n[0]), np.uint8), self.origin, np.full(3, spacing_mm), self.direction)
        return self.resample_to(ref, label=label)


def _few_labels(array: Array) -> bool:
    """LabelGaussian keeps labels apart without nearest-neighbour staircase; fine for small label counts."""
    return np.issubdtype(array.dtype, np.integer) and int(array.max(initial=0)) < 256


def empty_like(volume: Volume, dtype: npt.DTypeLike = np.uint8) -> Volume:
    return Volume(np.zeros(volume.shape, dtype), volume.origin.copy(), volume.spacing.copy(), volume.direction.copy())
