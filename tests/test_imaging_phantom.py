"""CT phantom: deterministic per seed, realistic HU per tissue, lesions of every kind with consistent labels."""

from __future__ import annotations

import numpy as np

from lesiontrack.synthetic.phantom import ORGANS, make_phantom

SMALL = dict(shape=(40, 72, 80), spacing=(4.0, 4.0, 4.0))


def test_same_seed_same_patient_other_seed_differs() -> None:
    a = make_phantom(7, **SMALL)
    b = make_phantom(7, **SMALL)
    c = make_phantom(8, **SMALL)
    np.testing.assert_array_equal(a.ct.array, b.ct.array)
    np.testing.assert_array_equal(a.lesions.array, b.lesions.array)
    assert [x.to_dict() for x in a.lesion_info] == [x.to_dict() for x in b.lesion_info]
    assert not np.array_equal(a.ct.array, c.ct.array)


def test_tissue_hu_noise_and_lesions() -> None:
    ph = make_phantom(1, **SMALL)
    ct, org, lab = ph.ct.array.astype(float), ph.organs.array, ph.lesions.array
    assert ct.dtype == float
    assert ph.ct.array.dtype == np.int16
    med = {
        name: float(np.median(ct[(org == ORGANS[name]) & (lab == 0)]))
        for name in ("lung", "fat", "muscle", "liver", "heart", "bone")
    }
    assert -920 < med["lung"] < -780
    assert -130 < med["fat"] < -60
    assert 30 < med["muscle"] < 75
    assert 80 < med["liver"] < 130
    assert med["bone"] > 200
    outside = ct[:, :4, :]  # air in front of the patient
    assert 8 < outside.std() < 30  # noise sd within 10–25 HU-ish
    kinds = {x.kind for x in ph.lesion_info}
    assert {"solid lung nodule", "liver lesion", "enlarged lymph node"} <= kinds
    for info in ph.lesion_info:
        mask = lab == info.label
        assert mask.sum() * 64.0 == info.volume_mm3 > 0
        centroid = np.array(info.params["centroid_mm"])
        assert np.linalg.norm(centroid - np.array(info.center_mm)) < info.radius_mm * 1.5
        if info.kind == "liver lesion":  # hypodense, 20–60 HU below liver
            assert -70 < float(np.median(ct[mask])) - med["liver"] < -10


def test_configurable_grid_and_spacing() -> None:
    ph = make_phantom(2, shape=(10, 30, 40), spacing=(3.0, 2.5, 5.0), center_mm=(0, 0, 40), n_lesions=0)
    assert ph.ct.shape == (10, 30, 40)
    np.testing.assert_allclose(ph.ct.spacing, (3.0, 2.5, 5.0))
    centre = ph.ct.index_to_patient(np.array([39, 29, 9]) / 2)
    np.testing.assert_allclose(centre, (0, 0, 40), atol=1e-9)
    assert ph.lesion_info == []
