"""Working grids and anti-aliased resampling for registration (all geometry in patient LPS mm).

The working grid has the follow-up's direction, isotropic ``spacing_mm`` voxels and covers the follow-up's
extent (centred, dimensions rounded up to a multiple of ``multiple`` so 2×/4× pooling is exact). Every
registration stage runs on it, so the result does not depend on the follow-up's native spacing or slice count.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from lesiontrack.models.imaging.volume import Volume

Array = np.ndarray


def placeholder_like(volume: Volume) -> Volume:
    """Geometry-only copy of ``volume`` (zero-stride array: no memory)."""
    arr = np.broadcast_to(np.zeros((), np.uint8), volume.shape)
    return Volume(arr, volume.origin.copy(), volume.spacing.copy(), volume.direction.copy())


def working_grid(followup: Volume, spacing_mm: float, multiple: int = 4, margin_mm: float = 0.0) -> Volume:
    """Isotropic grid in the follow-up's orientation covering its voxel-centre extent (+ ``margin_mm``)."""
    extent = followup.spacing * (np.array(followup.size_ijk, dtype=np.float64) - 1) + 2 * margin_mm
    n = np.ceil(extent / spacing_mm - 1e-6).astype(int) + 1
    n = np.maximum(n, 2 * multiple)
    n = ((n + multiple - 1) // multiple) * multiple
    # centre the (slightly larger) grid on the follow-up's extent
    centre_rel = 0.5 * followup.spacing * (np.array(followup.size_ijk, dtype=np.float64) - 1)
    start_rel = centre_rel - 0.5 * spacing_mm * (n - 1)
    origin = followup.origin + followup.direction @ start_rel
    arr = np.broadcast_to(np.zeros((), np.uint8), (int(n[2]), int(n[1]), int(n[0])))
    # start_rel: the grid's first voxel relative to the follow-up's origin along its axes (mm); kept so index maps
    # can be built without absolute coordinates (bit-identical when only the follow-up's origin changes)
    return Volume(
        arr,
        origin,
        np.full(3, float(spacing_mm)),
        followup.direction.copy(),
        {"start_rel": start_rel, "centre_rel": centre_rel},
    )


def followup_index_map(followup: Volume, grid: Volume) -> tuple[Array, Array]:
    """(A, b): working-grid index q (i, j, k) → follow-up continuous index ``A @ q + b`` (no absolute coords)."""
    return np.diag(grid.spacing / followup.spacing), np.asarray(grid.meta["start_rel"]) / followup.spacing


def shrink_factors(volume: Volume, target_spacing_mm: float | None) -> list[int]:
    if target_spacing_mm is None:
        return [1, 1, 1]
    f = [max(1, int(np.floor(target_spacing_mm / s + 1e-6))) for s in volume.spacing]
    return [min(v, max(1, n // 2)) for v, n in zip(f, volume.size_ijk, strict=True)]


def resample_index(
    volume: Volume,
    a: Array,
    b: Array,
    shape_kji: tuple[int, ...],
    *,
    target_spacing_mm: float | None = None,
    default: float = -1024.0,
) -> Array:
    """Sample ``volume`` (block-averaged towards ``target_spacing_mm``) at continuous indices ``a @ q + b`` for
    every output index ``q`` (i, j, k) of a ``shape_kji`` array; linear, float32.

    Working purely in index space keeps the result bit-identical under shifts of both grids' frames.
    """
    f = np.array(shrink_factors(volume, target_spacing_mm), dtype=np.float64)
    img = sitk.GetImageFromArray(np.asarray(volume.array, dtype=np.float32))
    if np.any(f > 1):
        img = sitk.BinShrink(img, [int(v) for v in f])
    img.SetOrigin((0.0, 0.0, 0.0))
    img.SetSpacing((1.0, 1.0, 1.0))
    img.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    # full-resolution index c ↔ shrunk index (c - (f - 1) / 2) / f
    a2 = np.asarray(a, dtype=np.float64) / f[:, None]
    b2 = (np.asarray(b, dtype=np.float64) - (f - 1) / 2) / f
    ref = sitk.Image([int(shape_kji[2]), int(shape_kji[1]), int(shape_kji[0])], sitk.sitkUInt8)
    out = sitk.Resample(img, ref, affine_transform(a2, b2), sitk.sitkLinear, float(default), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def fov_index(size_ijk: tuple[int, int, int], a: Array, b: Array, shape_kji: tuple[int, ...]) -> Array:
    """Boolean mask of output indices ``q`` whose source index ``a @ q + b`` lies inside ``size_ijk``."""
    nk, nj, ni = shape_kji
    k = np.arange(nk, dtype=np.float64)[:, None, None]
    j = np.arange(nj, dtype=np.float64)[None, :, None]
    i = np.arange(ni, dtype=np.float64)[None, None, :]
    inside = np.ones((nk, nj, ni), dtype=bool)
    for d in range(3):
        c = a[d, 0] * i + a[d, 1] * j + a[d, 2] * k + b[d]
        inside &= (c >= -0.5) & (c <= size_ijk[d] - 0.5)
    return inside


def grid_centre(grid: Volume) -> Array:
    """LPS position of the centre of the grid's voxel-centre extent."""
    return grid.index_to_patient((np.array(grid.size_ijk, dtype=np.float64) - 1) / 2.0)


def coarsen(grid: Volume, factor: int) -> Volume:
    """The grid obtained by ``factor``× average pooling of ``grid`` (exact when dims are multiples)."""
    n = np.array(grid.size_ijk) // factor
    sp = grid.spacing * factor
    origin = grid.index_to_patient(np.full(3, (factor - 1) / 2.0))
    arr = np.broadcast_to(np.zeros((), np.uint8), (int(n[2]), int(n[1]), int(n[0])))
    return Volume(arr, origin, sp, grid.direction.copy())


def to_float_sitk(volume: Volume, target_spacing_mm: float | None = None) -> sitk.Image:
    """Float32 SimpleITK image, block-averaged (``BinShrink``) so its spacing is at most ~``target_spacing_mm``.

    Block averaging is the anti-aliasing step before linear resampling to a much coarser grid.
    """
    img = volume.to_sitk()
    if img.GetPixelID() != sitk.sitkFloat32:
        img = sitk.Cast(img, sitk.sitkFloat32)
    if target_spacing_mm is not None:
        factors = [max(1, int(np.floor(target_spacing_mm / s + 1e-6))) for s in volume.spacing]
        factors = [min(f, max(1, n // 2)) for f, n in zip(factors, volume.size_ijk, strict=True)]
        if any(f > 1 for f in factors):
            img = sitk.BinShrink(img, factors)
    return img


def resample(
    image: sitk.Image,
    reference: Volume,
    transform: sitk.Transform | None = None,
    default: float = -1024.0,
    interpolator: int = sitk.sitkLinear,
) -> Array:
    """Resample a float image onto ``reference``'s grid; ``transform`` maps reference → image points."""
    ref = sitk.Image([int(v) for v in reference.size_ijk], sitk.sitkUInt8)
    ref.SetOrigin(tuple(float(v) for v in reference.origin))
    ref.SetSpacing(tuple(float(v) for v in reference.spacing))
    ref.SetDirection(tuple(float(v) for v in reference.direction.reshape(-1)))
    out = sitk.Resample(image, ref, transform or sitk.Transform(), interpolator, float(default), image.GetPixelID())
    return sitk.GetArrayFromImage(out)


def affine_transform(matrix: Array, offset: Array) -> sitk.AffineTransform:
    """SimpleITK transform ``p ↦ matrix @ p + offset`` (centre 0)."""
    t = sitk.AffineTransform(3)
    t.SetMatrix(tuple(float(v) for v in np.asarray(matrix, dtype=np.float64).reshape(-1)))
    t.SetTranslation(tuple(float(v) for v in np.asarray(offset, dtype=np.float64).reshape(3)))
    t.SetCenter((0.0, 0.0, 0.0))
    return t


def fov_mask(source: Volume, reference: Volume, matrix: Array, offset: Array, erode_vox: int = 0) -> Array:
    """Boolean mask on ``reference`` of voxels whose mapped point ``matrix @ p + offset`` lies inside ``source``."""
    nk, nj, ni = reference.shape
    k = np.arange(nk, dtype=np.float64)[:, None, None]
    j = np.arange(nj, dtype=np.float64)[None, :, None]
    i = np.arange(ni, dtype=np.float64)[None, None, :]
    # index(reference) -> world -> source index, as one affine map of the indices
    a = (
        np.linalg.inv(source.direction @ np.diag(source.spacing))
        @ matrix
        @ reference.direction
        @ np.diag(reference.spacing)
    )
    b = np.linalg.inv(source.direction @ np.diag(source.spacing)) @ (matrix @ reference.origin + offset - source.origin)
    size = np.array(source.size_ijk, dtype=np.float64)
    inside = np.ones(reference.shape, dtype=bool)
    for d in range(3):
        c = a[d, 0] * i + a[d, 1] * j + a[d, 2] * k + b[d]
        inside &= (c >= -0.5) & (c <= size[d] - 0.5)
    if erode_vox > 0:
        inside = ndimage.binary_erosion(inside, iterations=erode_vox, border_value=1)
    return inside


def body_mask(array: Array, threshold_hu: float = -500.0) -> Array:
    """Largest connected component above ``threshold_hu`` (the patient, without most of the table)."""
    fg = array > threshold_hu
    if not fg.any():
        return fg
    fg = ndimage.binary_opening(fg, iterations=1)
    lab, n = ndimage.label(fg)
    if n == 0:
        return array > threshold_hu
    sizes = ndimage.sum_labels(np.ones_like(lab, dtype=np.float32), lab, index=np.arange(1, n + 1))
    return lab == (int(np.argmax(sizes)) + 1)
