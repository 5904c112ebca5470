"""The RT structure sets we write for tests (synthetic/annotations.py) load in a real viewer: OHIF 3.13 (npm
@ohif/app dist, headless Debian Chromium) over Orthanc's DICOMweb opens one and lists its ROIs by name in the
segmentation panel (issue 31). dciodvfy and dcmtk's readers are checked in tests/test_annotations_readers.py; OHIF
does not render GSPS (OHIF issue #4106), dcmtk's dcmp2pgm renders ours there."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lesiontrack.demo_data import FollowUps, make_patient
from lesiontrack.models.imaging.dicom_read import read_series
from lesiontrack.pipeline.dicom.seg.reader import read_seg
from lesiontrack.synthetic.annotations import write_rtstruct
from tests.support.ohif import OhifExpectation, require_browser_stack, run_ohif_check
from tests.support.tools import REPO

pytestmark = [pytest.mark.slow, pytest.mark.services]

ARTIFACTS = Path(os.environ.get("LESIONTRACK_TEST_ARTIFACTS", REPO / "tests" / "artifacts")) / "ohif-rtstruct"


def _contours(patient_dir: Path) -> tuple[list[Path], list[tuple[str, list[np.ndarray]]]]:
    """The baseline CT of a small demo patient and, per lesion, its outline on every slice through it (a circle of
    the lesion's in-plane size around its centre there), named by the lesion's Tracking ID."""
    patient = make_patient(
        patient_dir, seed=8, shape=(40, 80, 80), spacing=(3.0, 3.0, 3.0), n_lesions=3, follow_ups=FollowUps.STILL
    )
    ct = read_series(patient.baseline.files)
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    rois = []
    for seg in read_seg(patient.seg_file, ct).segments:
        mask = np.asarray(seg.mask.array) > 0
        rings = []
        for k in np.nonzero(mask.any(axis=(1, 2)))[0]:
            ji = np.argwhere(mask[k])
            (cj, ci), r = ji.mean(axis=0), max(1.0, float(np.sqrt(len(ji) / np.pi)))
            ring = np.stack([ci + r * np.cos(t), cj + r * np.sin(t), np.full_like(t, k)], -1)
            rings.append(ct.index_to_patient(ring))
        rois.append((seg.identity.tracking_id, rings))
    return patient.baseline.files, rois


def test_ohif_opens_our_rtstruct_and_lists_its_rois(tmp_path: Path) -> None:
    require_browser_stack()
    ct_files, rois = _contours(tmp_path / "patient")
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in ct_files]
    path = write_rtstruct(heads, rois, tmp_path / "rs" / "rs.dcm")
    rs = pydicom.dcmread(path)
    rs.SeriesDescription = "Radiotherapy lesion contours"  # what the study browser shows (Type 3, not written)
    rs.save_as(path)
    names = [name for name, _ in rois]
    result, code = run_ohif_check(
        tmp_path,
        [*ct_files, path],
        str(rs.StudyInstanceUID),
        OhifExpectation(seg=str(rs.SeriesDescription), sr="", labels=names, focus_label=names[0]),
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for shot in result["screenshots"]:
        shutil.copy(shot, ARTIFACTS / Path(shot).name)
    assert result["labelsMissing"] == [], (result["labelsMissing"], result["segPanelText"][-1500:])
    assert code == 0, result
