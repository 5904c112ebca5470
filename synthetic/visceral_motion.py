"""Breathing with sliding organs: the viscera move against the chest and abdominal wall between two scans.

A smooth deformation (:mod:`synthetic.transforms`) cannot make what defeats registration in real follow-ups: the
lungs, liver, spleen and bowel slide cranio-caudally along the pleura and the abdominal wall by up to a few cm
from one breath-hold to the next, while ribs, spine and muscles stay where the patient lies. So two exact analytic
mappings are used: ``outer`` (the patient's repositioning and elastic motion: the wall, bones, muscles) and
``inner`` = ``outer`` plus a breathing displacement (cranio-caudal, largest at the diaphragm domes, fading towards
the lung apices, half of it low in the abdomen, with a little antero-posterior expansion). A follow-up voxel shows
the viscera where ``inner`` maps it into them, else the wall through ``outer``; the seam along the pleura and the
wall is as sharp as in a real pair of scans. With the phantom's ``bowel_state`` (loops moved, gas elsewhere) this is
the motion of bowel and breathing the new-lesion benchmark runs on (``bench/new_lesions.py --longitudinal``).
"""

from __future__ import annotations

import copy

import numpy as np
from scipy import ndimage

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.synthetic.phantom import ORGANS
from lesiontrack.synthetic.transforms import SpatialTransform, apply_transform

Array = np.ndarray

# organs that slide with breathing (the rest — wall, bone, muscle, aorta, spine, table — stays with the patient)
SLIDING = ("fat", "lung", "lung_vessel", "airway", "mediastinum", "heart", "liver", "spleen", "stomach", "kidney",
           "bowel", "esophagus", "ivc")  # fmt: skip


def viscera_mask(organs: Volume) -> Array:
    """The sliding viscera of a phantom organ map: organs in :data:`SLIDING` inside the muscle wall (the
    subcutaneous fat carries the same organ id as the abdominal fat and stays with the wall)."""
    org = organs.array
    wall_or_out = np.isin(org, [ORGANS["air"], ORGANS["table"], ORGANS["body_wall"], ORGANS["fat"]])
    inside = np.empty(org.shape, bool)
    for k in range(org.shape[0]):  # within the muscle ring: what the wall, bone and muscle enclose
        inside[k] = ndimage.binary_fill_holes(~wall_or_out[k])
    return inside & np.isin(org, [ORGANS[n] for n in SLIDING])


def breathing(
    outer: SpatialTransform, reference: Volume, amplitude_mm: float, dome_z_mm: float, apex_z_mm: float
) -> SpatialTransform:
    """``outer`` plus a breath-hold difference of ``amplitude_mm`` (positive: the viscera sit lower in the
    follow-up): full at and below the domes (``dome_z_mm``), fading to 0 at ``apex_z_mm``, half of it 150 mm below
    the domes; 15 % of it as antero-posterior expansion of the lower chest. Evaluated as extra weights on the same
    Gaussian lattice, so the mapping stays exact and smooth inside the viscera."""
    inner = copy.deepcopy(outer)
    if inner.lattice_axes is None or inner.weights is None:
        lo, hi = reference.world_bounds()
        axes = tuple(np.arange(lo[d] - 50.0, hi[d] + 50.0 + 1e-6, 50.0) for d in range(3))
        inner.lattice_axes = (axes[0], axes[1], axes[2])
        inner.weights = np.zeros((*tuple(len(a) for a in axes), 3))
        inner.sigma_mm = np.full(3, 40.0)
    ax, ay, az = inner.lattice_axes
    sigma = inner.sigma_mm
    part = float(
        np.prod([np.sum(np.exp(-0.5 * ((a - a[len(a) // 2]) / sigma[d]) ** 2)) for d, a in enumerate((ax, ay, az))])
    )
    span = max(apex_z_mm - dome_z_mm, 1.0)
    ramp = np.where(
        az >= dome_z_mm,
        np.clip((apex_z_mm - az) / span, 0.0, 1.0),
        np.clip(1.0 - 0.5 * (dome_z_mm - az) / 150.0, 0.5, 1.0),
    )
    w = inner.weights.copy()
    # follow-up → baseline: a viscus lower in the follow-up is found higher (+z) in the baseline
    w[..., 2] += amplitude_mm / part * ramp[None, None, :]
    centre_y = 0.5 * (ay[0] + ay[-1])
    w[..., 1] += 0.15 * amplitude_mm / part * np.sign(ay - centre_y)[None, :, None] * ramp[None, None, :]
    inner.weights = w
    return inner


def apply_sliding(
    canonical: Volume,
    viscera: Volume,
    outer: SpatialTransform,
    inner: SpatialTransform,
    grid: Volume,
    *,
    label: bool = False,
) -> Volume:
    """``canonical`` seen on ``grid`` when the ``viscera`` (bool/uint8 mask on the canonical grid) follow ``inner``
    and the rest follows ``outer``."""
    via_out = apply_transform(canonical, outer, grid, label=label)
    via_in = apply_transform(canonical, inner, grid, label=label)
    in_mask = apply_transform(viscera.with_array(viscera.array.astype(np.uint8)), inner, grid, label=True).array > 0
    return via_out.with_array(np.where(in_mask, via_in.array, via_out.array))
