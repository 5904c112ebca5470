"""Longitudinal synthesis: lesion identity kept, landmark pairs exact vs the stored transform, files written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lesiontrack.models.imaging.dicom_read import read_series
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.synthetic.lesion_change import GrowthParams, grow_lesion
from lesiontrack.synthetic.phantom import make_phantom
from lesiontrack.synthetic.synthesis import (
    SynthConfig,
    SynthIdentity,
    lesion_table,
    load_truth,
    synthesize_patient,
    write_patient,
)


@pytest.fixture(scope="module")
def patient():
    ph = make_phantom(11, shape=(44, 64, 72), spacing=(4.0, 4.0, 4.0), n_lesions=5)
    cfg = SynthConfig(p_new=1.0, p_vanish=0.0, n_landmarks=60)
    p = synthesize_patient(
        ph.ct,
        ph.lesions,
        np.random.default_rng(3),
        n_followups=2,
        config=cfg,
        identity=SynthIdentity(seed=11),
        lesion_kinds={x.label: x.kind for x in ph.lesion_info},
    )
    return ph, p


def test_identity_kept_and_lesions_follow_the_transform(patient) -> None:
    ph, p = patient
    base_labels = {x.label for x in ph.lesion_info}
    assert set(p.timepoints[0].lesions) == base_labels
    for tp in p.timepoints[1:]:
        assert base_labels <= set(tp.lesions)  # every baseline lesion is accounted for at every follow-up
        assert any(s.status == "new" for s in tp.lesions.values())  # p_new = 1
        for lab, st in tp.lesions.items():
            if st.status in ("present", "new") and st.volume_mm3 > 300 and not st.truncated_by_fov:
                # the follow-up centroid is where the exact transform sends the baseline-frame centroid
                mapped = tp.transform.baseline_to_followup(np.array(st.baseline_frame_center_mm))
                assert np.linalg.norm(mapped - np.array(st.center_mm)) < 4.0, (lab, st)
    new_1 = {lab for lab, s in p.timepoints[1].lesions.items() if s.status == "new"}
    assert all(p.timepoints[2].lesions[lab].status in ("present", "out_of_fov") for lab in new_1)
    assert not new_1 & base_labels  # new lesions get new labels


def test_followup_grid_and_intensity_changed(patient) -> None:
    _, p = patient
    base, fu = p.timepoints[0].ct, p.timepoints[1].ct
    assert not base.same_grid(fu)
    assert fu.array.dtype == np.int16
    assert p.timepoints[1].labels.same_grid(fu)
    assert p.timepoints[2].days_from_baseline > p.timepoints[1].days_from_baseline >= 42


def test_written_truth_landmarks_exact(patient, tmp_path: Path) -> None:
    _, p = patient
    root = write_patient(p, tmp_path)
    truth = load_truth(root)
    assert len(truth["timepoints"]) == 3
    ids = [(t["study_uid"], t["series_uid"], t["frame_of_reference_uid"]) for t in truth["timepoints"]]
    assert len({u for trip in ids for u in trip}) == 9
    dates = [t["study_date"] for t in truth["timepoints"]]
    assert dates == sorted(dates)
    assert len(set(dates)) == 3
    for t in truth["timepoints"][1:]:
        b = np.array(t["landmarks"]["baseline_mm"])
        f = np.array(t["landmarks"]["followup_mm"])
        assert len(b) >= 30
        err_fwd = np.linalg.norm(t["transform"].baseline_to_followup(b) - f, axis=1)
        err_back = np.linalg.norm(t["transform"].followup_to_baseline(f) - b, axis=1)
        assert err_fwd.max() < 0.1
        assert err_back.max() < 0.1
    tp1 = truth["timepoints"][1]
    vol = read_series(root / tp1["dicom_dir"])
    assert vol.meta["PatientID"] == p.patient_id
    assert vol.meta["StudyInstanceUID"] == tp1["study_uid"]
    np.testing.assert_allclose(vol.origin, tp1["grid"]["origin"], atol=1e-4)
    labels = Volume.read(str(root / tp1["label_map"]))
    assert labels.same_grid(vol, atol=1e-3)
    assert set(lesion_table(labels)) == {d["label"] for d in tp1["lesions"] if d["status"] in ("present", "new")}


def test_growth_and_shrinkage_change_volume() -> None:
    grid = np.zeros((40, 40, 40), np.uint16)
    kk, jj, ii = np.indices(grid.shape)
    ball = (kk - 20) ** 2 + (jj - 20) ** 2 + (ii - 20) ** 2 < 8**2
    grid[ball] = 3
    img = np.where(ball, 40, -850).astype(np.int16)
    ct, lab = Volume(img), Volume(grid)
    rng = np.random.default_rng(0)
    _, grown = grow_lesion(ct, lab, 3, GrowthParams(25.0, 2, 4.0), rng)
    _, shrunk = grow_lesion(ct, lab, 3, GrowthParams(-22.0, 2, 4.0), rng)
    v0 = (lab.array == 3).sum()
    assert (grown.array == 3).sum() > 1.2 * v0
    assert (shrunk.array == 3).sum() < 0.8 * v0


def test_vanished_lesion_becomes_the_dominant_surrounding_tissue() -> None:
    from lesiontrack.synthetic.lesion_change import remove_lesion

    kk, jj, ii = np.indices((30, 40, 40))
    img = np.full((30, 40, 40), -100, np.int16)  # fat ...
    img[:, :, 28:] = 60  # ... next to an organ the node touches
    node = (kk - 15) ** 2 + (jj - 20) ** 2 + (ii - 22) ** 2 < 6**2
    img[node] = 45
    lab = np.where(node, 2, 0).astype(np.uint16)
    out, out_lab = remove_lesion(Volume(img), Volume(lab), 2, np.random.default_rng(0))
    assert not (out_lab.array == 2).any()
    assert abs(float(np.median(out.array[node & (ii < 26)])) + 100) < 15  # fat, not a soft-tissue blob
