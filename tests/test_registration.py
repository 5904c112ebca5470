"""Registration engine: known motions recovered on real CT and the phantom, world-space geometry, labels, I/O.

Ground truth comes from ``synthetic.transforms`` (analytic follow-up → baseline maps). Registrations run at
a 4 mm working grid to keep the suite small; the benchmark (bench/registration.py) covers 2 mm.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from lesiontrack.config.settings import EngineSettings
from lesiontrack.models.engines import build_registration
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.registration import DisplacementFieldRegistration, Registration
from lesiontrack.synthetic.transforms import SpatialTransform, apply_transform, random_patient_motion, rotation_matrix
from tests.support.tools import require_shared_data

SPACING = 4.0


def _body_ct() -> Volume:
    v = Volume.read(str(require_shared_data("real", "body_ct", "ct.nii.gz")))
    return v.with_array(np.clip(v.array, -1024, 3071).astype(np.int16))


def _lung1() -> Volume:
    v = Volume.read(str(require_shared_data("real", "lung1", "lung1_image.nrrd")))
    return v.with_array(v.array.astype(np.int16))


def _grid(origin, spacing, shape_kji, direction=None) -> Volume:
    return Volume(
        np.zeros(shape_kji, np.uint8),
        np.asarray(origin, float),
        np.asarray(spacing, float),
        np.eye(3) if direction is None else direction,
    )


def _landmarks(baseline: Volume, followup: Volume, tr: SpatialTransform, n: int = 400, seed: int = 0):
    """Exact pairs: follow-up points inside the body whose baseline partner lies inside the baseline."""
    rng = np.random.default_rng(seed)
    cand = np.stack([rng.integers(2, s - 2, n * 30) for s in followup.shape], axis=1)
    cand = cand[followup.array[tuple(cand.T)] > -400]
    y = followup.index_to_patient(cand[:, ::-1].astype(float))
    x = tr.followup_to_baseline(y)
    idx = baseline.patient_to_index(x)
    ok = np.all((idx > 2) & (idx < np.array(baseline.size_ijk) - 3), axis=1)
    return y[ok][:n], x[ok][:n]


def _tre(reg: Registration, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(reg.map_points_to_baseline(y) - x, axis=1)


def _convex(**kw):
    return build_registration("convex", EngineSettings(working_spacing_mm=SPACING), device="cpu", **kw)


# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def body_case():
    """Real body CT; follow-up = rotation ≈4°, translation ≈15 mm, elastic 6 mm, on another grid (identity
    direction instead of the source's RAS-flipped one, 2.5×2.5×4 mm, 40 mm shorter z-range)."""
    base = _body_ct()
    tr = random_patient_motion(np.random.default_rng(7), base, rotation_deg=4, translation_mm=15, elastic_mm=6)
    lo, hi = base.world_bounds()
    sp = np.array([2.5, 2.5, 4.0])
    n = np.floor((hi - lo - np.array([0, 0, 40])) / sp).astype(int) + 1
    grid = _grid(lo + np.array([0, 0, 20]), sp, (n[2], n[1], n[0]))
    fu = apply_transform(base, tr, grid)
    reg = _convex().register(base, fu)
    return base, fu, tr, reg


def test_result_is_registration_protocol(body_case):
    *_, reg = body_case
    assert isinstance(reg, Registration)
    assert isinstance(reg, DisplacementFieldRegistration)
    q = reg.quality
    assert q.device == "cpu"
    assert q.similarity_metric == "ncc"
    assert q.similarity_after > q.similarity_before
    assert {"affine", "features", "convex", "adam", "total"} <= set(q.stage_seconds)
    assert 0.0 <= q.folding_fraction < 0.005


def test_rigid_plus_elastic_recovered_on_real_ct(body_case):
    base, fu, tr, reg = body_case
    y, x = _landmarks(base, fu, tr)
    before = np.linalg.norm(x - y, axis=1)
    err = _tre(reg, y, x)
    assert before.mean() > 10.0
    assert err.mean() < 1.5, (err.mean(), np.percentile(err, 95))
    assert np.percentile(err, 95) < 3.5


def test_inverse_consistency_both_directions(body_case):
    base, fu, tr, reg = body_case
    y, x = _landmarks(base, fu, tr)
    back = reg.map_points_to_followup(reg.map_points_to_baseline(y))
    assert np.abs(back - y).max() < 0.01
    # and the baseline → follow-up direction is as accurate as the forward one
    err = np.linalg.norm(reg.map_points_to_followup(x) - y, axis=1)
    assert err.mean() < 1.5


def test_saved_field_is_an_itk_displacement_field(body_case, tmp_path):
    base, fu, tr, reg = body_case
    path = reg.save_field(tmp_path / "field.nii.gz")
    img = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(img)
    y, _ = _landmarks(base, fu, tr, n=50)
    # interior points (the saved field is sampled on the working grid; stay a voxel inside it)
    via_itk = np.array([transform.TransformPoint(tuple(p)) for p in y])
    assert np.abs(via_itk - reg.map_points_to_baseline(y)).max() < 0.05


def test_warp_image_matches_truth(body_case):
    base, fu, _tr, reg = body_case
    warped = reg.warp_image(base)
    assert warped.same_grid(fu)
    assert warped.array.dtype == base.array.dtype
    body = fu.array > -400
    diff = np.abs(warped.array.astype(float) - fu.array.astype(float))[body]
    ident = Volume(base.array, base.origin, base.spacing, base.direction).resample_to(fu)
    diff0 = np.abs(ident.array.astype(float) - fu.array.astype(float))[body]
    assert np.median(diff) < 0.3 * np.median(diff0)


def test_labels_warp_without_mixing(body_case):
    base, fu, tr, reg = body_case
    lab = np.zeros(base.shape, np.uint8)
    c = np.array(base.shape) // 2
    lab[c[0] - 6 : c[0] + 6, c[1] - 8 : c[1], c[2] - 8 : c[2] + 8] = 1  # two touching boxes...
    lab[c[0] - 6 : c[0] + 6, c[1] : c[1] + 8, c[2] - 8 : c[2] + 8] = 2
    kk, jj, ii = np.ogrid[: base.shape[0], : base.shape[1], : base.shape[2]]
    lab[(kk - c[0]) ** 2 + (jj - c[1] + 14) ** 2 + (ii - c[2] - 16) ** 2 < 16] = 7  # ...and a small sphere
    labels = base.with_array(lab)
    warped = reg.warp_labels(labels)
    truth = apply_transform(labels, tr, fu, label=True)
    assert warped.same_grid(fu)
    assert set(np.unique(warped.array)) <= {0, 1, 2, 7}
    for value in (1, 2, 7):
        a, b = warped.array == value, truth.array == value
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.75, (value, dice)
    # a binary mask stays binary
    binary = reg.warp_labels(base.with_array((lab > 0).astype(np.uint8)))
    assert set(np.unique(binary.array)) <= {0, 1}


@pytest.mark.slow
def test_followup_origin_shift_moves_points_by_exactly_that_shift(body_case):
    base, fu, tr, reg = body_case
    shift = np.array([12.3, -7.7, 31.1])
    moved = Volume(fu.array, fu.origin + shift, fu.spacing, fu.direction)
    reg2 = _convex().register(base, moved)
    y, x = _landmarks(base, fu, tr, n=100)
    np.testing.assert_allclose(reg2.map_points_to_followup(x), reg.map_points_to_followup(x) + shift, atol=1e-3)
    np.testing.assert_allclose(reg2.map_points_to_baseline(y + shift), reg.map_points_to_baseline(y), atol=1e-3)


@pytest.mark.slow
def test_different_followup_grids_agree_in_world_space(body_case):
    """The same follow-up anatomy sampled on an oblique, anisotropic, shifted grid maps points the same way."""
    base, fu, tr, reg = body_case
    rot = rotation_matrix([0.0, 0.0, 25.0])  # oblique in-plane axes
    lo, hi = fu.world_bounds()
    centre = 0.5 * (lo + hi)
    sp = np.array([1.8, 2.2, 3.0])
    n = np.array([150, 130, 90])
    origin = centre - rot @ (sp * (n - 1) / 2)
    grid = _grid(origin, sp, (n[2], n[1], n[0]), rot)
    fu_b = apply_transform(base, tr, grid)
    reg_b = _convex().register(base, fu_b)
    y, x = _landmarks(base, fu, tr, n=200)
    inside = np.all((grid.patient_to_index(y) > 3) & (grid.patient_to_index(y) < n - 4), axis=1)
    diff = reg_b.map_points_to_baseline(y[inside]) - reg.map_points_to_baseline(y[inside])
    assert inside.sum() > 50
    # no systematic offset between the two (a flipped axis or half-voxel slip would show here) ...
    assert np.linalg.norm(diff.mean(0)) < 0.5, diff.mean(0)
    # ... and point-wise agreement within the two registrations' own errors (4 mm working grid)
    assert np.linalg.norm(diff, axis=1).mean() < 2.0
    assert _tre(reg_b, y[inside], x[inside]).mean() < 1.5


@pytest.mark.slow
def test_rigid_motion_recovered_on_real_lung_ct():
    """Real chest CT (0.57×0.57×5 mm): pure repositioning (≈5°, ≈20 mm) is recovered."""
    base = _lung1()
    tr = random_patient_motion(np.random.default_rng(3), base, rotation_deg=5, translation_mm=20, elastic_mm=0)
    fu = apply_transform(base, tr, base)
    reg = _convex().register(base, fu)
    y, x = _landmarks(base, fu, tr, n=300)
    err = _tre(reg, y, x)
    assert np.linalg.norm(x - y, axis=1).mean() > 10
    assert err.mean() < 1.5, (err.mean(), np.percentile(err, 95))
    assert np.percentile(err, 95) < 3.0, (err.mean(), np.percentile(err, 95))


@pytest.mark.slow
def test_phantom_smooth_deformation_and_determinism():
    from lesiontrack.synthetic.phantom import make_phantom

    ph = make_phantom(seed=3, shape=(64, 80, 96), spacing=(4.0, 4.0, 4.0), n_lesions=2)
    base = ph.ct
    tr = random_patient_motion(np.random.default_rng(11), base, rotation_deg=3, translation_mm=8, elastic_mm=8)
    fu = apply_transform(base, tr, base)
    fu = fu.with_array((fu.array + np.random.default_rng(1).normal(0, 15, fu.shape)).astype(np.int16))
    eng = _convex(adam_iterations=30)
    r1, r2 = eng.register(base, fu), eng.register(base, fu)
    np.testing.assert_array_equal(r1.forward, r2.forward)  # deterministic for a seed
    y, x = _landmarks(base, fu, tr, n=300)
    err, before = _tre(r1, y, x), np.linalg.norm(x - y, axis=1)
    assert err.mean() < 0.3 * before.mean(), (err.mean(), before.mean())
    assert err.mean() < 2.0, (err.mean(), before.mean())


@pytest.mark.slow
def test_simpleitk_engine_same_interface(body_case):
    base, fu, tr, _ = body_case
    reg = build_registration("simpleitk", EngineSettings(working_spacing_mm=SPACING)).register(base, fu)
    assert isinstance(reg, Registration)
    assert reg.engine == "simpleitk"
    y, x = _landmarks(base, fu, tr, n=200)
    assert _tre(reg, y, x).mean() < 3.0
    back = reg.map_points_to_followup(reg.map_points_to_baseline(y))
    assert np.abs(back - y).max() < 0.05


def test_unknown_engine_and_bad_input_are_clear_errors():
    with pytest.raises(ValueError, match="unknown registration engine"):
        build_registration("elastix")
    v = Volume(np.zeros((1, 10, 10), np.int16))
    with pytest.raises(ValueError, match="too small"):
        _convex().register(v, v)
