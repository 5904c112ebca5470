"""Volume → DICOM CT series → Volume: exact geometry, ≤ 1 HU, identity carried, files valid per dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from lesiontrack.models.imaging.dicom_read import read_series
from lesiontrack.models.imaging.dicom_write import CTSeriesHeader, write_ct_series
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.synthetic.transforms import rotation_matrix
from tests.support.tools import require_tool


def _ident() -> CTSeriesHeader:
    return CTSeriesHeader(
        patient_id="LT-0001",
        patient_name="Phantom^One",
        study_uid=generate_uid(),
        series_uid=generate_uid(),
        frame_of_reference_uid=generate_uid(),
        study_date="20260102",
    )


def test_round_trip_exact_geometry_and_hu(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.normal(0, 300, (7, 20, 24))).astype(np.float32)
    vol = Volume(
        arr,
        origin=(-101.25, 33.125, -512.5),
        spacing=(0.7421875, 0.8125, 2.5),
        direction=rotation_matrix([8.0, -5.0, 21.0]),
    )
    ident = _ident()
    files = write_ct_series(vol, tmp_path, replace(ident, issuer_of_patient_id="LT"))
    assert len(files) == 7
    back = read_series(tmp_path)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-6)
    np.testing.assert_allclose(back.spacing, vol.spacing, atol=1e-6)
    np.testing.assert_allclose(back.direction, vol.direction, atol=1e-6)
    assert np.max(np.abs(back.array - vol.array)) <= 0.5 + 1e-3
    assert back.meta["PatientID"] == "LT-0001"
    assert back.meta["IssuerOfPatientID"] == "LT"
    assert back.meta["StudyInstanceUID"] == ident.study_uid
    assert back.meta["SeriesInstanceUID"] == ident.series_uid
    assert back.meta["FrameOfReferenceUID"] == ident.frame_of_reference_uid
    assert back.meta["StudyDate"] == "20260102"
    assert back.meta["source_files"] == [str(f) for f in files]
    assert back.meta["SOPInstanceUIDs"] == [pydicom.dcmread(f).SOPInstanceUID for f in files]


def test_left_handed_volume_is_written_consistently(tmp_path: Path) -> None:
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    vol = Volume(arr, origin=(0, 0, 0), spacing=(1, 1, 3), direction=np.diag([1.0, 1.0, -1.0]))
    write_ct_series(vol, tmp_path, _ident())
    back = read_series(tmp_path)
    np.testing.assert_array_equal(back.array, arr[::-1])
    np.testing.assert_allclose(back.index_to_patient([0, 0, 0]), vol.index_to_patient([0, 0, 3]), atol=1e-9)


def test_written_files_pass_dciodvfy(tmp_path: Path) -> None:
    tool = shutil.which("dciodvfy") or str(Path(sys.executable).parent / "dciodvfy")
    require_tool(tool)
    vol = Volume(np.full((2, 16, 16), -1000, np.int16), spacing=(0.8, 0.8, 1.25))
    files = write_ct_series(vol, tmp_path, _ident())
    res = subprocess.run([tool, str(files[0])], capture_output=True, text=True)
    errors = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]
    assert not errors, "\n".join(errors)
