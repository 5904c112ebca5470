"""Lesion measurements on synthetic masks with known geometry, and changes vs previous / baseline / nadir."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.pipeline.jobs.contract import MeasuredLesion
from lesiontrack.pipeline.science.measurements import LesionChanges, LesionMeasurement, lesion_changes, measure_lesion

SP = np.array([0.5, 0.5, 1.0])


def _grid(shape=(40, 120, 120), direction=None) -> Volume:
    rng = np.random.default_rng(1)
    return Volume(
        rng.normal(30, 5, shape).astype(np.int16),
        origin=[-30.0, 10.0, -200.0],
        spacing=SP,
        direction=np.eye(3) if direction is None else direction,
    )


def _ellipsoid(ct: Volume, centre, radii, angle_deg: float = 0.0) -> np.ndarray:
    k, j, i = np.indices(ct.shape)
    p = ct.index_to_patient(np.stack([i, j, k], -1).reshape(-1, 3)).reshape((*ct.shape, 3)) - np.asarray(centre)
    th = np.deg2rad(angle_deg)
    x = p[..., 0] * np.cos(th) + p[..., 1] * np.sin(th)
    y = -p[..., 0] * np.sin(th) + p[..., 1] * np.cos(th)
    return ((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (p[..., 2] / radii[2]) ** 2) <= 1.0


def test_ellipsoid_axes_volume_centre_and_hu() -> None:
    ct = _grid()
    centre = ct.index_to_patient([60, 60, 20])
    m = _ellipsoid(ct, centre, (12.0, 6.0, 8.0), angle_deg=30)
    hu = ct.array.copy()
    hu[m] = 100
    ct = ct.with_array(hu)
    r = measure_lesion(ct.with_array(m.astype(np.uint8)), ct, tracking_uid="1.2.3", tracking_id="L1 liver")
    assert r.long_axis_mm == pytest.approx(24.0, abs=0.6)  # ± one pixel (0.5 mm)
    assert r.short_axis_mm == pytest.approx(12.0, abs=0.6)
    assert r.max_3d_diameter_mm == pytest.approx(24.0, abs=1.0)
    assert r.volume_mm3 == pytest.approx(4 / 3 * np.pi * 12 * 6 * 8, rel=0.03)
    assert r.volume_ml == pytest.approx(r.volume_mm3 / 1000)
    assert np.allclose(r.centre_mm, centre, atol=0.3)
    assert r.hu_mean == 100
    assert r.hu_sd == 0
    # long axis along 30°, on the central slice, perpendicular short axis
    la, sa = r.long_axis, r.short_axis
    d = np.subtract(la.end_mm, la.start_mm)
    ang = np.degrees(np.arctan2(d[1], d[0])) % 180
    assert abs(ang - 30) < 4
    e = np.subtract(sa.end_mm, sa.start_mm)
    assert abs(np.dot(d, e)) / (np.linalg.norm(d) * np.linalg.norm(e)) < 0.02
    assert la.slice_index == sa.slice_index == 20
    assert la.start_mm[2] == pytest.approx(centre[2])


def test_single_voxel_and_vanished() -> None:
    ct = _grid()
    m = np.zeros(ct.shape, np.uint8)
    m[5, 10, 10] = 1
    r = measure_lesion(ct.with_array(m), ct, tracking_uid="u", tracking_id="L1")
    assert r.long_axis_mm == pytest.approx(np.hypot(0.5, 0.5))  # pixel diagonal
    assert r.volume_mm3 == pytest.approx(0.25)
    gone = measure_lesion(ct.with_array(np.zeros(ct.shape, np.uint8)), ct, tracking_uid="u", tracking_id="L1")
    assert gone.status == "vanished"
    assert gone.volume_mm3 == 0
    assert gone.long_axis is None
    assert not gone.present


def test_mask_on_another_grid_is_resampled_onto_the_ct() -> None:
    ct = _grid()
    centre = ct.index_to_patient([60, 60, 20])
    fine = Volume(np.zeros((80, 120, 120), np.uint8), origin=ct.origin, spacing=[0.5, 0.5, 0.5])
    fine = fine.with_array(_ellipsoid(fine, centre, (8.0, 8.0, 8.0)).astype(np.uint8))
    r = measure_lesion(fine, ct, tracking_uid="u", tracking_id="L1")
    assert r.long_axis_mm == pytest.approx(16.0, abs=1.0)
    assert r.volume_mm3 == pytest.approx(4 / 3 * np.pi * 512, rel=0.05)


def test_rotated_grid_measures_in_patient_space() -> None:
    th = np.deg2rad(25)
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    ct = _grid(direction=rot)
    centre = ct.index_to_patient([60, 60, 20])
    m = _ellipsoid(ct, centre, (10.0, 5.0, 6.0))
    r = measure_lesion(ct.with_array(m.astype(np.uint8)), ct, tracking_uid="u", tracking_id="L1")
    d = np.subtract(r.long_axis.end_mm, r.long_axis.start_mm)
    assert r.long_axis_mm == pytest.approx(20.0, abs=0.6)
    # along patient x (L) within the pixelisation of the tips (< 9°), not along the grid's 25° axis
    assert abs(d[1]) / np.linalg.norm(d) < 0.15


def test_json_round_trip() -> None:
    ct = _grid()
    m = _ellipsoid(ct, ct.index_to_patient([60, 60, 20]), (6.0, 4.0, 3.0))
    r = measure_lesion(
        ct.with_array(m.astype(np.uint8)),
        ct,
        tracking_uid="u",
        tracking_id="L2 lymph node",
        is_node=True,
        series_uid="1.2",
        anatomic_site="lymph node",
    )
    d = json.loads(json.dumps(r.to_dict()))
    back = LesionMeasurement.from_dict(d)
    assert back == r
    assert d["recist_diameter_mm"] == r.short_axis_mm  # nodes: short axis


def test_recorded_measure_output_keeps_its_on_disk_shape() -> None:
    """The measure step records the typed measurement as ``to_dict()`` and reads the stored dictionaries back."""
    current = _m("u", 12.0, 900.0)
    changes = lesion_changes([_m("u", 10.0, 500.0), current])
    assert changes is not None
    stored = json.loads(json.dumps(MeasuredLesion(measurement=current, changes=changes).model_dump(mode="json")))
    assert stored == {"measurement": current.to_dict() | {"status": "present"}, "changes": changes.to_dict()}
    back = MeasuredLesion.model_validate(stored)  # a job recorded before the model was typed loads the same
    assert back.measurement == current
    assert back.changes == changes
    assert back.tracking_uid == "u"
    assert MeasuredLesion.model_validate({"measurement": stored["measurement"], "changes": None}).changes is None


def _m(uid: str, ld: float, vol: float, status: str = "present") -> LesionMeasurement:
    from lesiontrack.pipeline.science.measurements import Axis

    return LesionMeasurement(
        uid,
        "L1",
        status=status,
        volume_mm3=vol,
        voxel_count=1 if vol else 0,
        long_axis=Axis(ld, (0, 0, 0), (ld, 0, 0), 0) if ld else None,
    )


def test_changes_previous_baseline_nadir() -> None:
    # baseline 20 mm / 4000 mm3, then 10 / 1000 (nadir), then vanished-but-assessed?, no: 12 / 1500
    hist = [_m("u", 20, 4000), _m("u", 10, 1000), None, _m("u", 12, 1500)]
    ch = lesion_changes(hist)
    assert isinstance(ch, LesionChanges)
    la = ch.metrics["long_axis_mm"]
    assert la.value == 12
    assert (la.previous.reference_value, la.previous.absolute, la.previous.percent) == (10, 2, pytest.approx(20))
    assert (la.baseline.absolute, la.baseline.percent) == (-8, pytest.approx(-40))
    assert (la.nadir.reference_value, la.nadir.absolute) == (10, 2)
    vol = ch.metrics["volume_mm3"]
    assert vol.baseline.percent == pytest.approx(-62.5)
    assert vol.nadir.percent == pytest.approx(50)
    # vanished → 0, percentage vs 0 is undefined (None)
    ch2 = lesion_changes([_m("u", 20, 4000), _m("u", 0, 0, "vanished"), _m("u", 5, 100)])
    assert ch2.metrics["long_axis_mm"].nadir.reference_value == 0
    assert ch2.metrics["long_axis_mm"].nadir.percent is None
    assert lesion_changes([_m("u", 20, 4000)]).metrics["long_axis_mm"].baseline is None
    assert lesion_changes([_m("u", 20, 4000), None]) is None
    assert LesionChanges.from_dict(json.loads(json.dumps(ch.to_dict()))) == ch
