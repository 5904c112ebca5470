"""The Volume convention: index ⇄ LPS mm, SimpleITK bridge, NIfTI (RAS) → LPS, resampling onto another grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.synthetic.transforms import rotation_matrix


def _vol() -> Volume:
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # [k, j, i]
    return Volume(arr, origin=(10.0, -20.0, 30.0), spacing=(0.5, 0.75, 2.0), direction=rotation_matrix([10, 0, 30]))


def test_index_patient_round_trip_and_sitk_agree() -> None:
    v = _vol()
    img = v.to_sitk()
    for ijk in ([0, 0, 0], [5, 4, 3], [2.5, 1.25, 0.5]):
        p = v.index_to_patient(np.array(ijk, float))
        np.testing.assert_allclose(p, img.TransformContinuousIndexToPhysicalPoint(ijk), atol=1e-9)
        np.testing.assert_allclose(v.patient_to_index(p), ijk, atol=1e-9)
    # array[k, j, i] is the voxel at index (i, j, k)
    assert v.array[3, 4, 5] == img.GetPixel(5, 4, 3)
    back = Volume.from_sitk(img)
    assert back.same_grid(v)
    assert np.array_equal(back.array, v.array)


def test_nifti_ras_is_read_as_lps(tmp_path: Path) -> None:
    v = Volume(np.zeros((3, 4, 5), np.int16), origin=(1.0, 2.0, 3.0), spacing=(1, 1, 1))
    v.array[2, 3, 4] = 7
    v.write(str(tmp_path / "v.nii.gz"))
    back = Volume.read(str(tmp_path / "v.nii.gz"))
    np.testing.assert_allclose(
        back.index_to_patient(np.array(np.argwhere(back.array == 7)[0][::-1], float)),
        v.index_to_patient([4, 3, 2]),
        atol=1e-5,
    )


def test_resample_onto_shifted_grid() -> None:
    v = Volume(np.zeros((10, 10, 10), np.int16), spacing=(2.0, 2.0, 2.0))
    v.array[5, 5, 5] = 100
    ref = Volume(np.zeros((10, 10, 10), np.uint8), origin=(-4.0, 0.0, 2.0), spacing=(2.0, 2.0, 2.0))
    out = v.resample_to(ref)
    # patient point (10, 10, 10) is index (7, 5, 4) in ref
    assert out.array[4, 5, 7] == 100
    assert out.array[out.array > -1024].sum() == 100
    lab = Volume(np.zeros((10, 10, 10), np.uint8), spacing=(2.0, 2.0, 2.0))
    lab.array[2:6, 2:6, 2:6] = 3
    iso = lab.resample_isotropic(1.0, label=True)
    assert set(np.unique(iso.array)) == {0, 3}
    assert abs((iso.array == 3).sum() * 1.0 - (lab.array == 3).sum() * 8.0) / ((lab.array == 3).sum() * 8.0) < 0.3


def test_a_label_map_resampled_onto_its_own_grid_is_unchanged() -> None:
    # a nodule two 5 mm slices thick: the label interpolator's smoothing used to halve it even on the same grid
    lab = Volume(np.zeros((12, 20, 20), np.uint8), spacing=(0.7, 0.7, 5.0))
    lab.array[5:7, 9:11, 9:12] = 1
    same = Volume(np.zeros((12, 20, 20), np.uint8), spacing=(0.7, 0.7, 5.0))
    out = lab.resample_to(same, label=True)
    np.testing.assert_array_equal(out.array, lab.array)
    assert out.array is not lab.array
