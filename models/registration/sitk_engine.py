"""Engine "simpleitk": the classical baseline — shared robust affine, then SimpleITK fast symmetric-forces
demons (3-level pyramid) on the working grid. Same result type and geometry as the default engine."""

from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk
import torch

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.registration.convex import compose_fixed_point_inverse
from lesiontrack.models.registration.field import DisplacementFieldRegistration
from lesiontrack.models.registration.stages import build_result, prepare


def _image(array: np.ndarray, grid: Volume) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    img.SetOrigin(tuple(float(v) for v in grid.origin))
    img.SetSpacing(tuple(float(v) for v in grid.spacing))
    img.SetDirection(tuple(float(v) for v in grid.direction.reshape(-1)))
    return img


class SimpleITKEngine:
    name = "simpleitk"
    version = f"demons-{sitk.Version.VersionString()}"

    def __init__(
        self,
        working_spacing_mm: float = 2.0,
        levels: tuple[int, ...] = (4, 2, 1),
        iterations: int = 50,
        smoothing_sigma_vox: float = 1.5,
        affine: bool = True,
    ) -> None:
        self.working_spacing_mm = working_spacing_mm
        self.levels = levels
        self.iterations = iterations
        self.sigma = smoothing_sigma_vox
        self.affine = affine

    def register(self, baseline: Volume, followup: Volume) -> DisplacementFieldRegistration:
        timings: dict[str, float] = {}
        t_all = time.perf_counter()
        prep = prepare(baseline, followup, self.working_spacing_mm, self.affine, timings, erode_vox=0)
        t = time.perf_counter()
        lo, hi = -1000.0, 1500.0
        fixed = _image(np.clip(prep.fixed, lo, hi), prep.grid)
        moving = _image(np.clip(prep.moving, lo, hi), prep.grid)
        field: sitk.Image | None = None
        for f in self.levels:
            fx = (
                sitk.Shrink(sitk.SmoothingRecursiveGaussian(fixed, 0.5 * f * self.working_spacing_mm), [f] * 3)
                if f > 1
                else fixed
            )
            mv = (
                sitk.Shrink(sitk.SmoothingRecursiveGaussian(moving, 0.5 * f * self.working_spacing_mm), [f] * 3)
                if f > 1
                else moving
            )
            demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
            demons.SetNumberOfIterations(self.iterations)
            demons.SetStandardDeviations(self.sigma)
            demons.SetSmoothDisplacementField(True)
            if field is None:
                field = demons.Execute(fx, mv)
            else:
                init = sitk.Resample(field, fx, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
                field = demons.Execute(fx, mv, init)
        timings["demons"] = time.perf_counter() - t
        t = time.perf_counter()
        if field is None:
            raise ValueError("demons registration needs at least one pyramid level")
        disp = sitk.GetArrayFromImage(field).astype(np.float64)  # (K, J, I, 3) world mm
        vox = disp @ prep.grid.direction / self.working_spacing_mm  # world → (i, j, k) voxel components
        u_vox = np.ascontiguousarray(np.moveaxis(vox, -1, 0), dtype=np.float32)
        with torch.no_grad():
            v_vox = compose_fixed_point_inverse(torch.from_numpy(u_vox)[None], 20)[0].numpy()
        timings["inverse"] = time.perf_counter() - t
        return build_result(prep, u_vox, v_vox, self.name, "cpu", timings, t_all)
