"""Blob measure of the new-lesion detector (models.detection.blobness): a ball is a blob, a vessel or a wall is not,
on any grid, bright or dark; and the detector's two tests built on it and on the surroundings (issue 29)."""

from __future__ import annotations

import numpy as np
import pytest

from lesiontrack.models.detection.blobness import blob_measure

SP = np.array([2.5, 1.5, 1.5])  # k, j, i (mm)


def _grid(shape: tuple[int, int, int] = (24, 48, 48)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k, j, i = np.indices(shape).astype(float)
    c = (np.array(shape) - 1) / 2.0
    return (k - c[0]) * SP[0], (j - c[1]) * SP[1], (i - c[2]) * SP[2]


def _measure(image: np.ndarray, comp: np.ndarray, diameter: float, bright: bool = True) -> float:
    idx = np.argwhere(comp)
    lo, hi = idx.min(0), idx.max(0) + 1
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    return blob_measure(image, comp[sl], sl, SP, diameter, bright)


def test_a_ball_is_a_blob_and_a_piece_of_a_vessel_or_wall_is_not() -> None:
    z, y, x = _grid()
    ball = np.where(z**2 + y**2 + x**2 <= 5.0**2, 0.0, -850.0)
    vessel = np.where(z**2 + y**2 <= 2.0**2, 0.0, -850.0)  # along x, through the whole grid
    wall = np.where(np.abs(y) <= 2.0, 0.0, -850.0)  # a sheet
    piece = (z**2 + y**2 + x**2) <= 4.0**2  # the compact residual subtraction cut out of it
    assert _measure(ball, piece, 10.0) > 0.7
    assert _measure(vessel, piece & (vessel > -400), 5.0) < 0.2
    assert _measure(wall, piece & (wall > -400), 5.0) < 0.2


@pytest.mark.parametrize("bright", [True, False])
def test_the_sign_of_the_lesion_counts(bright: bool) -> None:
    z, y, x = _grid()
    inside = z**2 + y**2 + x**2 <= 6.0**2
    dark = np.where(inside, 60.0, 100.0)  # a hypodense lesion in liver
    m = _measure(dark, inside, 12.0, bright)
    assert (m == 0.0) if bright else (m > 0.7)


def test_the_detector_reports_a_new_nodule_and_not_a_vessel_that_moved_along_its_axis() -> None:
    """Lung with a vessel: at follow-up the vessel reaches 10 mm further (it moved along its axis, out of the
    compared neighbourhood) and a nodule appeared. Subtraction shows both; only the nodule is a blob."""
    from lesiontrack.models.detection import DetectionOptions, detect_new_lesions
    from lesiontrack.models.imaging.volume import Volume

    shape, sp = (48, 96, 96), np.array([1.5, 1.5, 1.5])
    k, j, i = (np.indices(shape).astype(float).T * sp[::-1]).T  # mm
    rng = np.random.default_rng(3)
    body = -850.0 + np.zeros(shape)

    def vessel(x_end: float) -> np.ndarray:
        return ((k - 36.0) ** 2 + (j - 50.0) ** 2 <= 2.2**2) & (i >= 20.0) & (i <= x_end)

    prior = np.where(vessel(70.0), 40.0, body)
    fu = np.where(vessel(82.0), 40.0, body)
    nodule = (k - 36.0) ** 2 + (j - 100.0) ** 2 + (i - 70.0) ** 2 <= 4.5**2
    fu = np.where(nodule, 20.0, fu)

    def vol(a: np.ndarray) -> Volume:
        noisy = a + rng.normal(0.0, 6.0, shape)
        return Volume(np.clip(np.rint(noisy), -1024, 3071).astype(np.int16), spacing=sp[::-1].copy())

    cands = detect_new_lesions(vol(fu), vol(prior), None, DetectionOptions(keep_rejected=True))
    at_nodule = [c for c in cands if c.mask[nodule].any()]
    at_vessel = [c for c in cands if c.mask[vessel(82.0) & ~vessel(70.0)].any()]
    assert at_nodule, at_nodule
    assert not at_nodule[0].rejected, at_nodule
    assert at_nodule[0].blobness > 0.7, at_nodule
    assert at_vessel, at_vessel
    assert all(c.rejected for c in at_vessel), at_vessel
    # the blob measure alone would reject it, whichever test names the reason first (here the misfit test)
    assert all(c.blobness < DetectionOptions().min_blobness for c in at_vessel), at_vessel


def test_a_darker_focus_counts_only_where_its_surroundings_agree_with_the_prior() -> None:
    """Liver-like parenchyma: a hypodense lesion appears in one place (its surroundings unchanged: new); in another
    the same darkening comes with a brighter rim around it (the surroundings changed too, as at a sliding seam)."""
    from lesiontrack.models.detection import DetectionOptions, detect_new_lesions
    from lesiontrack.models.imaging.volume import Volume

    shape = (48, 96, 96)
    k, j, i = (np.indices(shape).astype(float).T * 1.5).T  # mm
    rng = np.random.default_rng(5)
    organ = (np.abs(k - 36.0) < 30.0) & (np.abs(j - 72.0) < 60.0) & (np.abs(i - 72.0) < 60.0)
    prior = np.where(organ, 100.0, -100.0)
    r_a = np.sqrt((k - 36.0) ** 2 + (j - 45.0) ** 2 + (i - 72.0) ** 2)
    r_b = np.sqrt((k - 36.0) ** 2 + (j - 100.0) ** 2 + (i - 72.0) ** 2)
    fu = np.where(r_a <= 6.0, 55.0, prior)
    fu = np.where(r_b <= 6.0, 55.0, np.where((r_b > 6.0) & (r_b <= 11.0), 130.0, fu))

    def vol(a: np.ndarray) -> Volume:
        noisy = a + rng.normal(0.0, 5.0, shape)
        return Volume(np.clip(np.rint(noisy), -1024, 3071).astype(np.int16), spacing=np.array([1.5, 1.5, 1.5]))

    cands = detect_new_lesions(vol(fu), vol(prior), None, DetectionOptions(keep_rejected=True))
    at_a = [c for c in cands if c.mask[r_a <= 3.0].any()]
    at_b = [c for c in cands if c.mask[r_b <= 3.0].any() and c.kind == "hypodense"]
    assert at_a, at_a
    assert not at_a[0].rejected, at_a
    assert at_a[0].surround_ratio <= DetectionOptions().max_surround_ratio
    assert at_b, at_b
    assert all("surroundings changed" in c.rejected for c in at_b), at_b


def test_a_hypodense_lesion_at_an_organs_edge_is_judged_against_its_own_organ() -> None:
    """A hypodense lesion at the liver's edge is a step down to the fat on one side: against the fat it is no dark
    ball; with tissue darker than the lesion read as the organ's parenchyma it is (and a dark vessel is not)."""
    z, y, x = _grid()
    organ = np.where(x <= 3.0, 100.0, -100.0)  # parenchyma up to x = 3 mm, fat beyond
    inside = z**2 + y**2 + (x + 1.0) ** 2 <= 6.0**2
    edge = np.where(inside & (x <= 3.0), 55.0, organ)
    comp = inside & (x <= 3.0)
    assert _measure_beyond(edge, comp, 12.0, None) < 0.2
    assert _measure_beyond(edge, comp, 12.0, (35.0, 100.0)) > 0.5
    vessel = np.where((z**2 + y**2 <= 2.0**2) & (x <= 3.0), 55.0, organ)
    piece = (z**2 + y**2 + (x + 8.0) ** 2 <= 4.0**2) & (vessel < 80.0)
    assert _measure_beyond(vessel, piece, 5.0, (35.0, 100.0)) < 0.2


def _measure_beyond(image: np.ndarray, comp: np.ndarray, diameter: float, beyond: tuple[float, float] | None) -> float:
    idx = np.argwhere(comp)
    lo, hi = idx.min(0), idx.max(0) + 1
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    return blob_measure(image, comp[sl], sl, SP, diameter, False, beyond)


def test_a_darker_focus_must_be_a_dark_blob() -> None:
    """Liver-like parenchyma: a hypodense ball appears (new) and a dark tube appears (a vessel, fissure or sliding
    edge seen darker): only the ball is a candidate."""
    from lesiontrack.models.detection import DetectionOptions, detect_new_lesions
    from lesiontrack.models.imaging.volume import Volume

    shape = (48, 96, 96)
    k, j, i = (np.indices(shape).astype(float).T * 1.5).T  # mm
    rng = np.random.default_rng(6)
    organ = (np.abs(k - 36.0) < 30.0) & (np.abs(j - 72.0) < 60.0) & (np.abs(i - 72.0) < 60.0)
    prior = np.where(organ, 100.0, -100.0)
    ball = (k - 36.0) ** 2 + (j - 45.0) ** 2 + (i - 72.0) ** 2 <= 6.0**2
    tube = ((k - 36.0) ** 2 + (j - 100.0) ** 2 <= 2.5**2) & (np.abs(i - 72.0) <= 20.0)
    fu = np.where(ball | tube, 55.0, prior)

    def vol(a: np.ndarray) -> Volume:
        noisy = a + rng.normal(0.0, 5.0, shape)
        return Volume(np.clip(np.rint(noisy), -1024, 3071).astype(np.int16), spacing=np.array([1.5, 1.5, 1.5]))

    cands = detect_new_lesions(vol(fu), vol(prior), None, DetectionOptions(keep_rejected=True))
    at_ball = [c for c in cands if c.mask[ball].any()]
    at_tube = [c for c in cands if c.mask[tube].any() and c.kind == "hypodense"]
    assert at_ball, cands
    assert not at_ball[0].rejected, at_ball
    assert all(c.rejected for c in at_tube), at_tube
