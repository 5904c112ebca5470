"""Coarse anatomy for the new-lesion search, from the images alone (no model weights): lungs, gas outside the
lungs (bowel, stomach, airways), solid parenchymal organs and the liver, on the detector's working grid.

Used to name a candidate's organ and to suppress the usual false sources of temporal subtraction:

* **lungs** — air-density regions inside the body that are parenchyma (smoothed median above −975 HU: lung holds
  vessels and interstitium; a gas pocket is pure air) and large (≥ 30 mL), with the holes they enclose in a slice
  up to 40 mm across (vessels, nodules) filled in — not the liver dome or the heart they encircle;
* **gas** — every other air-density voxel inside the body in either scan: bowel and stomach gas moves and changes
  between scans, so a difference beside it is bowel content, not a lesion;
* **solid organs** — thick, homogeneous soft tissue within ±35 HU of the commonest thick-tissue attenuation in
  either scan (opened with a 4.5 mm ball, components ≥ 100 mL, holes filled per slice): hypodense lesions are
  looked for only there;
* **liver** — the solid-organ component that is largest, lies on the patient's right and whose centre is below
  the lungs' centre (≥ 300 mL).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

Array = np.ndarray


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


def find_anatomy(fu_s: Array, pr_s: Array, body: Array, sp_kji: Array, x_mm: Array, z_mm: Array) -> Anatomy:
    """``fu_s``/``pr_s``: smoothed follow-up and (contrast-corrected) warped prior on the working grid; ``body``:
    the body mask; ``x_mm``/``z_mm``: patient-LPS x of each column (i axis) and z of each slice (k axis) of an
    axial working grid (the patient's right side; caudal)."""
    vox_ml = float(np.prod(sp_kji)) / 1000.0
    air = body & ((fu_s < -400.0) | (pr_s < -400.0))
    labels, n = ndi.label(air)
    lung = np.zeros_like(air)
    if n:
        counts = np.bincount(labels.ravel(), minlength=n + 1)
        med = ndi.median(fu_s, labels, index=np.arange(n + 1))
        keep = (counts * vox_ml >= 30.0) & (np.asarray(med) > -975.0)
        keep[0] = False
        lung = keep[labels]
        if lung.any():
            lung = _fill_small_holes(ndi.binary_closing(lung, structure=_ball(3.0, sp_kji)) | lung, sp_kji, 40.0)
    gas = body & ~lung & ((fu_s < -500.0) | (pr_s < -500.0))

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
            lung_z = float(np.mean(z_mm[np.argwhere(lung)[:, 0]])) if lung.any() else None
            body_x = float(np.mean(x_mm[np.argwhere(body)[:, 2]]))
            best, best_n = 0, 0
            for lab in np.nonzero(big)[0]:
                idx = np.argwhere(labels == lab)
                if counts[lab] * vox_ml < 300.0:
                    continue
                right = float(np.mean(x_mm[idx[:, 2]])) < body_x  # LPS: +x is the patient's left
                below = lung_z is None or float(np.mean(z_mm[idx[:, 0]])) < lung_z
                if right and below and counts[lab] > best_n:
                    best, best_n = int(lab), int(counts[lab])
            if best:
                liver = _fill_slices(ndi.binary_closing(labels == best, structure=_ball(4.0, sp_kji)))
    return Anatomy(lung, gas, solid, liver)
