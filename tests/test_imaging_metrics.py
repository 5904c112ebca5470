"""Metrics against hand-computed values: Dice, NSD, centre distance, TRE, and the §9.2 tracking aggregation."""

from __future__ import annotations

import numpy as np
import pytest

from lesiontrack.models.imaging.metrics import (
    LesionResult,
    centre_distance,
    dice,
    evaluate_lesion,
    nsd,
    tracking_metrics,
    tre,
)
from lesiontrack.models.imaging.volume import Volume


def test_dice_hand_computed() -> None:
    p = np.zeros((1, 1, 10), bool)
    g = np.zeros((1, 1, 10), bool)
    p[0, 0, 0:4] = True  # 4 voxels
    g[0, 0, 1:7] = True  # 6 voxels, overlap 3
    assert dice(p, g) == pytest.approx(0.6)
    assert dice(np.zeros(3), np.zeros(3)) == 1.0


def _plates(k_p: int, k_g: int, g_cols: int = 10) -> tuple[np.ndarray, np.ndarray]:
    p = np.zeros((8, 10, 10), bool)
    g = np.zeros((8, 10, 10), bool)
    p[k_p, :, :] = True
    g[k_g, :, :g_cols] = True
    return p, g


def test_nsd_hand_computed() -> None:
    p, g = _plates(2, 5)  # plates 3 slices apart
    assert nsd(p, g, 2.0, spacing=(1, 1, 0.5)) == pytest.approx(1.0)  # 1.5 mm apart
    assert nsd(p, g, 2.0, spacing=(1, 1, 1.0)) == pytest.approx(0.0)  # 3 mm apart
    p, g = _plates(2, 3, g_cols=5)
    # P: columns i<=5 within 1.5 mm (i=5: sqrt(2)) -> 60 of 100; G: all 50 within 1 mm -> (60+50)/150
    assert nsd(p, g, 1.5, spacing=(1, 1, 1)) == pytest.approx(110 / 150)
    assert nsd(p, np.zeros_like(g), 2.0) == 0.0


def test_centre_distance_and_tre() -> None:
    a = Volume(np.zeros((5, 5, 5), np.uint8), spacing=(2.0, 1.0, 3.0))
    b = a.with_array(np.zeros((5, 5, 5), np.uint8))
    a.array[1, 1, 1] = 1
    b.array[2, 1, 3] = 1  # Δi = 2 → 4 mm, Δk = 1 → 3 mm
    assert centre_distance(a, b) == pytest.approx(5.0)
    assert centre_distance(a, a.with_array(np.zeros((5, 5, 5), np.uint8))) is None
    r = tre(np.array([[0, 0, 0], [1, 1, 1], [3, 4, 0]]), np.array([[0, 0, 0], [1, 1, 2], [0, 0, 0]]))
    np.testing.assert_allclose(r.per_point, [0.0, 1.0, 5.0])
    assert r.mean == pytest.approx(2.0)
    assert r.median == pytest.approx(1.0)
    assert r.max == 5.0
    assert r.n == 3


def test_tracking_metrics_per_scan_then_patient() -> None:
    res = [
        LesionResult("A", "s1", 1, 0.8, 5.0, True, True),
        LesionResult("A", "s1", 2, 0.5, 30.0, True, True),  # centre > 25 mm: not matched
        LesionResult("A", "s1", 3, 0.0, None, True, False),  # missed
        LesionResult("A", "s2", 1, 0.6, 10.0, True, True),
        LesionResult("B", "s1", 1, 0.9, 2.0, True, True),
        LesionResult("B", "s1", 2, 1.0, None, False, False),  # vanished, correctly nothing predicted
    ]
    s = tracking_metrics(res)
    assert s.cpm25 == pytest.approx(100 * ((1 / 3 + 1) / 2 + 1) / 2)
    assert s.dice25 == pytest.approx(((0.8 + 0.6) / 2 + 0.9) / 2)
    assert s.med_mm == pytest.approx(((17.5 + 10) / 2 + 2) / 2)
    assert s.dice == pytest.approx((((0.8 + 0.5 + 0) / 3 + 0.6) / 2 + 0.95) / 2)
    assert (s.n_patients, s.n_scans, s.n_lesions) == (2, 3, 6)


def test_evaluate_lesion_from_masks() -> None:
    gt = Volume(np.zeros((6, 6, 6), np.uint8))
    gt.array[1:3, 1:3, 1:3] = 1
    pred = gt.with_array(np.roll(gt.array, 1, axis=2))
    r = evaluate_lesion("P", "s", 4, pred, gt)
    assert r.dice == pytest.approx(0.5)
    assert r.distance_mm == pytest.approx(1.0)
    assert r.matched
    assert evaluate_lesion("P", "s", 4, None, gt).dice == 0.0
    assert evaluate_lesion("P", "s", 4, pred, None).dice == 0.0
