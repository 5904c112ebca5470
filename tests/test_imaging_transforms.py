"""Synthetic patient-motion transforms: exact inverse, serialisation, separable grid evaluation, resampling."""

from __future__ import annotations

import numpy as np

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.synthetic.transforms import (
    SpatialTransform,
    _grid_points,
    apply_transform,
    random_patient_motion,
    rotation_matrix,
)


def _ref() -> Volume:
    return Volume(np.zeros((40, 60, 70), np.int16), origin=(-70.0, -60.0, -40.0), spacing=(2.0, 2.0, 2.0))


def test_inverse_is_exact_to_hundredth_mm() -> None:
    rng = np.random.default_rng(1)
    tr = random_patient_motion(rng, _ref(), rotation_deg=5, translation_mm=10, elastic_mm=6, breathing_mm=8)
    pts = rng.uniform(-60, 60, (500, 3))
    back = tr.baseline_to_followup(tr.followup_to_baseline(pts))
    assert np.max(np.linalg.norm(back - pts, axis=1)) < 0.01
    assert tr.max_jacobian_norm(_ref()) <= 0.41


def test_pure_rigid_matches_formula() -> None:
    rot = rotation_matrix([0, 0, 90])
    tr = SpatialTransform(rot, center=(0, 0, 0), translation=(1, 2, 3))
    np.testing.assert_allclose(tr.followup_to_baseline([[10.0, 0, 0]]), [[1.0, 12.0, 3.0]], atol=1e-12)
    np.testing.assert_allclose(tr.baseline_to_followup([[1.0, 12.0, 3.0]]), [[10.0, 0, 0]], atol=1e-9)


def test_roundtrip_dict_and_separable_grid_eval() -> None:
    rng = np.random.default_rng(2)
    tr = random_patient_motion(rng, _ref(), elastic_mm=5)
    tr2 = SpatialTransform.from_dict(tr.to_dict())
    flipped = Volume(
        np.zeros((10, 12, 14), np.int16),
        origin=(30, -20, 10),
        spacing=(3, 2.5, 2),
        direction=np.diag([-1.0, 1.0, -1.0])[:, [1, 0, 2]],
    )
    pts = _grid_points(flipped)
    np.testing.assert_allclose(tr2.map_grid(flipped), tr.followup_to_baseline(pts), atol=1e-9)


def test_apply_transform_moves_a_blob_to_the_mapped_point() -> None:
    ref = _ref()
    tr = SpatialTransform(rotation_matrix([0, 0, 10]), center=(0, 0, 0), translation=(6.0, -4.0, 2.0))
    arr = np.zeros(ref.shape, np.uint8)
    centre_b = np.array([10.0, 8.0, 4.0])
    pts = _grid_points(ref)
    arr[np.linalg.norm(pts - centre_b, axis=-1) < 8] = 3
    lab = apply_transform(ref.with_array(arr), tr, ref, label=True)
    assert set(np.unique(lab.array)) == {0, 3}
    centre_f = pts[lab.array == 3].mean(0)
    expected = tr.baseline_to_followup(centre_b[None])[0]
    assert np.linalg.norm(centre_f - expected) < 0.5
