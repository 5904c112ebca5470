"""A measurement drawn in the real OHIF and saved to Orthanc becomes the prior of the next follow-up Orthanc routes
(issue 31, "real peers in tests").

Orthanc, its routing script and LesionTrack are set up from docs/pacs/orthanc.md as written (tests/support/pacs_guide:
the guide's JSON incl. its ``DicomWeb`` section, its Lua, its TOML; ``lesiontrack serve`` as a subprocess). The
baseline CT alone is imported into Orthanc — no SEG, no SR. In OHIF 3.13 (npm @ohif/app dist, headless Debian
Chromium, playwright-core; tests/browser/ohif-draw.mjs) the radiologist opens the baseline, goes to the slice where a
liver lesion is largest, draws a line across it with OHIF's own Length tool, names it and saves the report as OHIF
does (Create SR → Save: STOW-RS to Orthanc's DICOMweb). Then the follow-up CT is uploaded to Orthanc; its Lua routes
it to LesionTrack, which finds the baseline in Orthanc, retrieves the CT and OHIF's SR, and sends a SEG and a report
back. The lesion must be tracked from that SR: named by the radiologist's label, its segment non-empty and where the
drawn lesion is, the prompt origin a single line, the radiologist's diameter beside ours."""

from __future__ import annotations

import os
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lesiontrack.db.models import JobState
from lesiontrack.demo_data import DemoPatient, FollowUps, make_patient
from lesiontrack.models.imaging.dicom_read import read_series
from lesiontrack.pipeline.dicom.seg.reader import read_seg
from lesiontrack.pipeline.jobs.contract import LoadVolumesOutput, job_results, read_output
from tests.support.ohif import require_browser_stack, run_ohif_draw
from tests.support.pacs_guide import GuideSite
from tests.support.segsr import content_items
from tests.support.services import wait_for
from tests.support.tools import REPO

pytestmark = [pytest.mark.slow, pytest.mark.services]

LABEL = "L2 liver"  # what the radiologist names the measurement in OHIF
ARTIFACTS = Path(os.environ.get("LESIONTRACK_TEST_ARTIFACTS", REPO / "tests" / "artifacts")) / "ohif-drawn"


def _line_across_largest_lesion(patient: DemoPatient) -> tuple[np.ndarray, np.ndarray]:
    """Where a radiologist would measure: the long axis, left to right, of the largest lesion on the slice where it
    is largest (LPS mm, voxel edges to voxel edges)."""
    ct = read_series(patient.baseline.files)
    lesion = max(read_seg(patient.seg_file, ct).segments, key=lambda s: int(np.count_nonzero(s.mask.array)))
    mask = np.asarray(lesion.mask.array) > 0
    k = int(np.argmax(mask.sum(axis=(1, 2))))
    (j0, i0), (j1, i1) = np.argwhere(mask[k]).min(0), np.argwhere(mask[k]).max(0)
    row = (j0 + j1) / 2
    return ct.index_to_patient(np.array([i0 - 0.5, row, k])), ct.index_to_patient(np.array([i1 + 0.5, row, k]))


def _ohif_sr(site: GuideSite, study_uid: str) -> pydicom.Dataset:
    """The one SR in the baseline study (the report OHIF stored)."""
    srs = [ds for series in site.results_in_orthanc(study_uid).values() for ds in series if ds.Modality == "SR"]
    assert len(srs) == 1, [(ds.SeriesNumber, ds.SeriesDescription) for ds in srs]
    return srs[0]


def test_a_line_drawn_in_ohif_is_the_prior_of_the_routed_follow_up(tmp_path: Path) -> None:
    require_browser_stack()
    patient = make_patient(
        tmp_path / "patient",
        seed=8,
        shape=(40, 80, 80),
        spacing=(3.0, 3.0, 3.0),
        n_lesions=3,
        n_followups=1,
        follow_ups=FollowUps.MOTION,
    )
    start, end = _line_across_largest_lesion(patient)
    fu = patient.followups[0]
    site = GuideSite(tmp_path / "site", dicomweb=True)
    try:
        site.upload(patient.baseline.files)  # the CT only: the radiologist measures in the viewer
        drawn = run_ohif_draw(tmp_path / "ohif", site.orthanc.url, patient.baseline.study_uid, (start, end), LABEL)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for shot in drawn.screenshots:  # the slice, the line drawn, the named measurement
            shutil.copy(shot, ARTIFACTS / Path(shot).name)
        assert f"{LABEL}\n" in drawn.panel_text, drawn.panel_text[-800:]
        ohif_sr = _ohif_sr(site, patient.baseline.study_uid)
        assert str(ohif_sr.get("Manufacturer", "")) != "LesionTrack"

        site.upload(fu.files)  # Orthanc's Lua routes it when stable
        jobs = wait_for(partial(site.finished, fu.series_uid), 600, f"the analysis of {fu.series_uid}")
        wait_for(partial(site.delivered, fu.study_uid), 300, f"the results of {fu.series_uid} in Orthanc")
        results = site.results_in_orthanc(fu.study_uid)
        on_prior = site.results_in_orthanc(patient.baseline.study_uid)
    finally:
        site.stop()

    [job] = jobs
    assert job.state is JobState.DONE, job.error
    assert job.attempts == 1, f"analysed only at attempt {job.attempts}"
    match = job_results(job.step_outputs).match
    assert match is not None
    assert match.prior.ct_series_uid == patient.baseline.series_uid
    assert match.prior.annotation.sop_instance_uid == ohif_sr.SOPInstanceUID, "prompted from OHIF's report"
    loaded = read_output(job.step_outputs, LoadVolumesOutput)
    assert loaded is not None
    assert [(r.tracking_id, r.prompt_origin) for r in loaded.lesions] == [(LABEL, "line")]

    seg = results[901][0]
    seg_path = tmp_path / "result_seg.dcm"
    seg.save_as(seg_path)
    follow_ct = read_series(fu.files)
    [tracked] = [s for s in read_seg(seg_path, follow_ct).segments if s.identity.tracking_id == LABEL]
    voxels = np.argwhere(np.asarray(tracked.mask.array) > 0)
    assert len(voxels), "the tracked lesion's segment is empty"
    centre = follow_ct.index_to_patient(voxels.mean(axis=0)[::-1])
    # the follow-up moved (rigid 2 deg, 6 mm and 2 mm elastic at most): the lesion is found where it was drawn
    assert np.linalg.norm(centre - (start + end) / 2) < 15.0, (centre, start, end)
    _check_report(results[902][0], float(np.linalg.norm(end - start)))
    # the 3-D lesion derived from the line went to the PACS on the prior study, for the radiologist to see
    assert 905 in on_prior, {k: [str(d.SeriesDescription) for d in v] for k, v in on_prior.items()}
    [derived] = on_prior[905]
    assert derived.StudyInstanceUID == patient.baseline.study_uid
    assert derived.SegmentSequence[0].SegmentDescription.startswith("Derived from the radiologist's measurement: line")


def _check_report(report: pydicom.Dataset, drawn_mm: float) -> None:
    """Our report names the prior annotation a single line and puts the radiologist's diameter beside ours."""
    items = content_items(report)
    names = {str(i.TextValue) for i in items if _concept(i) == "112039"}
    assert any(n.startswith(LABEL) for n in names), names
    origins = {str(i.ConceptCodeSequence[0].CodeValue) for i in items if _concept(i) == "LT059"}
    assert origins == {"LT076"}, origins  # "Single diameter on one image"
    [long_axis] = [i for i in items if _concept(i) == "LT067"]  # the radiologist's long axis on the prior
    value = float(long_axis.MeasuredValueSequence[0].NumericValue)
    assert abs(value - drawn_mm) < 1.0, (value, drawn_mm)


def _concept(item: pydicom.Dataset) -> str | None:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else None
