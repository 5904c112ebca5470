"""DICOM series → Volume: geometry of every interop CT series (tilt, gaps, J2K), multi-frame, refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from lesiontrack.models.imaging.dicom_read import SeriesError, group_series, read_series
from tests.support.tools import require_shared_data

INTEROP = ("interop",)


def _images(folder: Path) -> list[pydicom.Dataset]:
    out: list[pydicom.Dataset] = []
    for f in sorted(folder.iterdir()):
        try:
            ds = pydicom.dcmread(f)
        except Exception:
            continue
        if "PixelData" in ds:
            out.append(ds)
    return out


def _sample_patient(volume, pts: np.ndarray) -> np.ndarray:
    idx = volume.patient_to_index(pts)
    return ndimage.map_coordinates(
        volume.array.astype(np.float32), [idx[..., 2], idx[..., 1], idx[..., 0]], order=1, mode="nearest"
    )


def _check_against_acquired_pixels(volume, datasets: list[pydicom.Dataset], stride: int = 8) -> None:
    """Hand-computed positions: every acquired pixel centre (IPP + c·Δc·row + r·Δr·col) must hold its value."""
    errs, vals = [], []
    for ds in datasets:
        ipp = np.array(ds.ImagePositionPatient, float)
        iop = np.array(ds.ImageOrientationPatient, float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        r, c = np.meshgrid(np.arange(0, ds.Rows, stride), np.arange(0, ds.Columns, stride), indexing="ij")
        pts = ipp + (c * dc)[..., None] * iop[:3] + (r * dr)[..., None] * iop[3:]
        hu = ds.pixel_array[::stride, ::stride].astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        got = _sample_patient(volume, pts)
        errs.append(np.abs(got - hu).ravel())
        vals.append(hu.ravel())
    err = np.concatenate(errs)
    assert np.median(err) < 1.0, np.median(err)
    assert np.mean(err) < 0.05 * np.std(np.concatenate(vals))


@pytest.mark.parametrize("sub", ["ct_phantom_tilt_philips/S2010", "ct_phantom_tilt_philips/S3010", "ct_gantry_tilt_ge"])
def test_tilted_series_geometry_matches_acquired_planes(sub: str) -> None:
    folder = require_shared_data(*INTEROP, *sub.split("/"))
    vol = read_series(folder)
    assert "gantry tilt" in vol.meta["geometry_fix"]
    dss = _images(folder)
    iop = np.array(dss[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    np.testing.assert_allclose(vol.direction[:, 2], normal, atol=1e-6)  # k follows the plane normal
    np.testing.assert_allclose(vol.direction[:, 0], iop[:3], atol=1e-6)
    d = np.sort([np.dot(np.array(ds.ImagePositionPatient, float), normal) for ds in dss])
    assert abs(vol.origin @ normal - d[0]) < 1e-6
    assert abs((vol.index_to_patient([0, 0, vol.shape[0] - 1]) @ normal) - d[-1]) < vol.spacing[2]
    assert len(vol.meta["SOPInstanceUIDs"]) == len(dss)
    assert vol.meta["slices_match_instances"] is False
    _check_against_acquired_pixels(vol, dss)
    if sub == "ct_gantry_tilt_ge":
        assert "irregular slice spacing 1.08–7.00 mm" in vol.meta["geometry_fix"]
        assert vol.spacing[2] == pytest.approx(4.002, abs=0.01)
        # ignoring the tilt (SimpleITK's stacking) would displace far slices by tan(18.5°)·Δz ≈ 48 mm


@pytest.mark.parametrize("sub", ["ct_siemens_j2k", "seg_sr/dcmqi_ct-3slice"])
def test_regular_series_match_simpleitk(sub: str) -> None:
    import SimpleITK as sitk

    folder = require_shared_data(*INTEROP, *sub.split("/"))
    vol = read_series(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    ref = reader.Execute()
    np.testing.assert_allclose(vol.origin, ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(vol.spacing, ref.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(vol.direction.ravel(), ref.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(ref))
    assert vol.meta["slices_match_instances"]
    assert "geometry_fix" not in vol.meta
    dss = sorted(_images(folder), key=lambda ds: float(ds.ImagePositionPatient[2]))
    _check_against_acquired_pixels(vol, dss[:3])
    if sub == "ct_siemens_j2k":  # JPEG 2000 lossless decoded to the right HU range
        assert str(vol.meta["TransferSyntaxUID"]) == "1.2.840.10008.1.2.4.90"
        assert vol.array.min() == -1024
        assert vol.array.max() > 1000
        assert vol.meta["identity_incomplete"]  # this sample is anonymised without UIDs
    else:
        assert vol.meta["SeriesInstanceUID"] == dss[0].SeriesInstanceUID
        assert vol.meta["SOPInstanceUIDs"] == [ds.SOPInstanceUID for ds in dss]
        assert vol.meta["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.2"
        assert len(vol.meta["source_files"]) == 3


def _copy_3slice(tmp: Path) -> list[Path]:
    src = require_shared_data(*INTEROP, "seg_sr", "dcmqi_ct-3slice")
    out = []
    for f in sorted(src.iterdir()):
        shutil.copy(f, tmp / f.name)
        out.append(tmp / f.name)
    return out


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEGLSLossless", "JPEG2000Lossless"])
def test_sorting_ignores_instance_number_and_compressed_decoding(tmp_path: Path, syntax: str) -> None:
    uid = getattr(pydicom.uid, syntax)
    files = _copy_3slice(tmp_path)
    ref = read_series(files)
    for n, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = 10 - n  # reversed numbering must not matter
        ds.compress(uid)
        ds.save_as(f)
    vol = read_series(list(reversed(files)))
    assert vol.meta["TransferSyntaxUID"] == uid
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_allclose(vol.origin, ref.origin)


def test_enhanced_multiframe_ct(tmp_path: Path) -> None:
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    files = _copy_3slice(tmp_path)
    ref = read_series(files)
    dss = [pydicom.dcmread(f) for f in files]
    mf = LegacyConvertedEnhancedCTImage(
        dss,
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=9,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    out = tmp_path / "mf"
    out.mkdir()
    mf.save_as(out / "enhanced.dcm")
    vol = read_series(out)
    assert vol.shape == ref.shape
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_allclose(vol.origin, ref.origin, atol=1e-5)
    np.testing.assert_allclose(vol.spacing, ref.spacing, atol=1e-5)
    assert vol.meta["source_frames"] == [0, 1, 2] or sorted(vol.meta["source_frames"]) == [0, 1, 2]


def test_refuses_localizer(tmp_path: Path) -> None:
    files = _copy_3slice(tmp_path)
    ds = pydicom.dcmread(files[1])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(files[1])
    with pytest.raises(SeriesError, match=rf"{files[1].name}.*localizer"):
        read_series(tmp_path)


def test_refuses_mixed_series_and_names_them(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    _copy_3slice(a)
    folder = require_shared_data(*INTEROP, "ct_gantry_tilt_ge")
    shutil.copy(folder / "01.dcm", tmp_path / "ge01.dcm")
    groups = group_series(tmp_path)
    assert len(groups) == 2
    with pytest.raises(SeriesError, match="mixes 2 series"):
        read_series(tmp_path)
    ge_uid = pydicom.dcmread(folder / "01.dcm", stop_before_pixels=True).SeriesInstanceUID
    assert read_series(tmp_path, series_uid=ge_uid).shape[0] == 1


def test_refuses_mixed_orientation_and_duplicates(tmp_path: Path) -> None:
    files = _copy_3slice(tmp_path)
    ds = pydicom.dcmread(files[2])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9, -0.43588989]
    ds.save_as(files[2])
    with pytest.raises(SeriesError, match=rf"{files[2].name}.*ImageOrientationPatient.*mixed orientations"):
        read_series(tmp_path)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = pydicom.dcmread(files[1]).ImagePositionPatient
    ds.save_as(files[2])
    with pytest.raises(SeriesError, match="duplicate slice position"):
        read_series(tmp_path)


def test_non_dicom_and_empty_inputs(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SeriesError, match="no DICOM image files"):
        read_series(tmp_path)
    with pytest.raises(SeriesError, match="no such file"):
        read_series(tmp_path / "missing")


@pytest.mark.parametrize(("flag", "uid"), [("+e1", "1.2.840.10008.1.2.4.70"), ("+el", "1.2.840.10008.1.2.4.57")])
def test_jpeg_lossless_made_by_dcmtk(tmp_path: Path, flag: str, uid: str) -> None:
    import subprocess

    from tests.support.tools import require_tool

    require_tool("dcmcjpeg")
    src = tmp_path / "src"
    src.mkdir()
    files = _copy_3slice(src)
    ref = read_series(files)
    out = tmp_path / "jpeg"
    out.mkdir()
    for f in files:
        subprocess.run(["dcmcjpeg", flag, str(f), str(out / f.name)], check=True, capture_output=True)
    vol = read_series(out)
    assert vol.meta["TransferSyntaxUID"] == uid
    np.testing.assert_array_equal(vol.array, ref.array)
