"""Coarse anatomy for the new-lesion search, from the images alone (no model weights): lungs, gas outside the
lungs (bowel, stomach, airways), solid parenchymal organs and the liver, on the detector's working grid.

Used to name a candidate's organ and to suppress the usual false sources of temporal subtraction:

* **lungs** — air-density regions inside the body that are parenchyma (smoothed median above −975 HU: lung holds
  vessels and interstitium; a gas pocket is pure air), large (≥ 30 mL) and thick (``LUNG_MIN_DEPTH_MM``: not the
  air layer between the back and the table), with the holes they enclose in a slice
  up to 40 mm across (vessels, nodules) filled in — not the liver dome or the heart they encircle;
* **gas** — every other air-density voxel inside the body in either scan: bowel and stomach gas moves and changes
  between scans, so a difference beside it is bowel content, not a lesion;
* **solid organs** — thick, homogeneous soft tissue within ±35 HU of the commonest thick-tissue attenuation in
  either scan (opened with a 4.5 mm ball, components ≥ 100 mL, holes filled per slice): hypodense lesions are
  looked for only there;
* **liver** — the largest solid-organ component (≥ 300 mL) whose centre lies on the patient's right and below the
  lungs' centre (not the heart; any height where no lung is in view). No component fits → no liver: a candidate
  there is named "soft tissue", never a guessed organ. On an unenhanced CT (liver, spleen and muscle within a few
  HU) the solid organs merge and no liver is named.

The lungs are looked for inside the body less a 3 mm surface shell and must be thick (the skin–air partial
volume, a thin air-density shell round the whole body, and the air layer between the back and the table, inside
the body mask whose holes are filled, both counted as "lung" down the abdomen and moved the lungs' centre below the
liver's); gas outside the lungs that is connected to that shell is outside the patient, not bowel gas; the prior
counts only where it was imaged (outside its field of view the warp's −1024 HU is not air: a whole uncovered slab
counted as "lung").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

Array = np.ndarray

LUNG_MIN_DEPTH_MM = 15.0
"""A lung holds a ball of this radius; the air between the patient's back and the table (inside the body mask,
whose holes are filled) is a layer a few mm to a centimetre thick, and would otherwise be "lung" on every slice."""


@dataclass(frozen=True)
class Anatomy:
    """Bool masks on the working grid (k, j, i)."""

    lung: Array
    gas: Array
    solid: Array
    liver: Array


def _ball(radius_mm: float, sp_kji: Array) -> Array:
    r = np.maximum(1, np.floor(radius_mm / np.asarray(sp_kji) + 0.5).astype(int))
    zz, yy, xx = np.ogrid[-r[0] : r[0] + 1, -r[1] : r[1] + 1, -r[2] : r[2] + 1]
    return np.asarray(((zz * sp_kji[0]) ** 2 + (yy * sp_kji[1]) ** 2 + (xx * sp_kji[2]) ** 2) <= radius_mm**2)


def _fill_slices(mask: Array) -> Array:
    out = np.empty_like(mask)
    for k in range(mask.shape[0]):
        out[k] = ndi.binary_fill_holes(mask[k])
    return out


def _fill_small_holes(mask: Array, sp_kji: Array, max_diameter_mm: float) -> Array:
    """Per slice, the holes of ``mask`` up to ``max_diameter_mm`` (equivalent circle) filled: the vessels and nodules
    inside a lung, not the liver dome or the heart that the lung encircles."""
    out = mask.copy()
    max_px = np.pi * (max_diameter_mm / 2.0) ** 2 / float(sp_kji[1] * sp_kji[2])
    for k in range(mask.shape[0]):
        holes = ndi.binary_fill_holes(mask[k]) & ~mask[k]
        if not holes.any():
            continue
        lab, n = ndi.label(holes)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        small = sizes <= max_px
        small[0] = False
        out[k] |= small[lab]
    return out


def find_anatomy(
    fu_s: Array,
    pr_s: Array,
    body: Array,
    sp_kji: Array,
    x_mm: Array,
    z_mm: Array,
    uncovered: Array | None = None,
) -> Anatomy:
    """``fu_s``/``pr_s``: smoothed follow-up and (contrast-corrected) warped prior on the working grid; ``body``:
    the body mask; ``x_mm``/``z_mm``: patient-LPS x of each column (i axis) and z of each slice (k axis) of an
    axial working grid (the patient's right side; caudal); ``uncovered``: where the prior was not imaged (its
    values there are not looked at)."""
    vox_ml = float(np.prod(sp_kji)) / 1000.0
    pr_air = pr_s < -400.0
    if uncovered is not None:
        pr_air &= ~uncovered
    # not the body's surface: the skin–air partial volume there is a thin air-density shell round the whole body
    inner = ndi.binary_erosion(body, structure=_ball(3.0, sp_kji), border_value=1)
    air_all = body & ((fu_s < -400.0) | pr_air)
    air = inner & air_all
    labels, n = ndi.label(air)
    lung = np.zeros_like(air)
    if n:
        counts = np.bincount(labels.ravel(), minlength=n + 1)
        med = ndi.median(fu_s, labels, index=np.arange(n + 1))
        depth = ndi.maximum(ndi.distance_transform_edt(air, sampling=sp_kji), labels, index=np.arange(n + 1))
        keep = (counts * vox_ml >= 30.0) & (np.asarray(med) > -975.0) & (np.asarray(depth) >= LUNG_MIN_DEPTH_MM)
        keep[0] = False
        lung = keep[labels]
        if lung.any():
            lung = _fill_small_holes(ndi.binary_closing(lung, structure=_ball(3.0, sp_kji)) | lung, sp_kji, 40.0)
    # gas is inside the patient: air connected to the body's surface shell (the skin–air partial volume, the air
    # between the back and the table that the body mask's filled holes enclose) is not bowel gas
    lab_all, _n_all = ndi.label(air_all & ~lung)
    touching = np.unique(lab_all[air_all & ~lung & ~inner])
    outside = np.isin(lab_all, touching[touching > 0])
    gas = air & ~lung & ~outside & ((fu_s < -500.0) | (pr_air & (pr_s < -500.0)))

    thick = body & ~lung & (fu_s > -30.0) & (fu_s < 250.0)
    core = ndi.binary_erosion(thick, structure=_ball(6.0, sp_kji))
    solid = np.zeros_like(body)
    liver = np.zeros_like(body)
    if core.sum() > 100:
        hist, edges = np.histogram(fu_s[core], bins=np.arange(-30.0, 252.0, 6.0))
        mode = float(edges[int(np.argmax(hist))] + 3.0)
        # parenchyma in either scan: a new lesion's site was parenchyma in the prior even where the lesion now
        # opens the organ's outline in the follow-up
        par = body & ~lung & ((np.abs(fu_s - mode) < 35.0) | (np.abs(pr_s - mode) < 35.0))
        par = ndi.binary_opening(par, structure=_ball(4.5, sp_kji))
        labels, n = ndi.label(par)
        if n:
            counts = np.bincount(labels.ravel(), minlength=n + 1)
            big = counts * vox_ml >= 100.0
            big[0] = False
            solid = _fill_slices(big[labels])
            best = _liver_component(labels, counts * vox_ml, big, lung, body, x_mm, z_mm, vox_ml)
            if best:
                liver = _fill_slices(ndi.binary_closing(labels == best, structure=_ball(4.0, sp_kji)))
    return Anatomy(lung, gas, solid, liver)


def _liver_component(
    labels: Array, volumes_ml: Array, big: Array, lung: Array, body: Array, x_mm: Array, z_mm: Array, vox_ml: float
) -> int:
    """The label of the solid component that is the liver (0: none fits; see the module docstring)."""
    body_x = float(np.mean(x_mm[np.argwhere(body)[:, 2]]))
    lung_z = float(np.mean(z_mm[np.argwhere(lung)[:, 0]])) if float(lung.sum()) * vox_ml >= 100.0 else None
    for lab in [int(v) for v in np.argsort(-volumes_ml)]:
        if not big[lab] or volumes_ml[lab] < 300.0:
            continue
        idx = np.argwhere(labels == lab)
        right = float(np.mean(x_mm[idx[:, 2]])) < body_x  # LPS: +x is the patient's left
        below = lung_z is None or float(np.mean(z_mm[idx[:, 0]])) < lung_z
        if right and below:
            return lab
    return 0
