"""docs/pacs/orthanc.md, followed as written (issue 29): Orthanc's configuration is the guide's ``json`` block, its
routing the guide's ``lua`` block, LesionTrack's configuration the guide's ``toml`` block — only host names, ports,
paths and the data folder replaced by loopback values, plus the small phantom's working spacing — and LesionTrack
runs as the guide says: ``lesiontrack db upgrade``, then ``lesiontrack serve`` (a real subprocess, receiver
processes and all defaults of the guide).

Two patients: one whose baseline carries a radiologist's DICOM-SEG, one whose baseline carries only a TID 1500 SR
with RECIST long/short axis lines (as OHIF saves them). Their baselines are imported into Orthanc (not routed: no
earlier study), then three follow-ups each are uploaded to Orthanc and routed by its Lua script when stable. Each
follow-up must be analysed the first time (one job, one attempt, nothing skipped), with the prior retrieved by
LesionTrack from Orthanc, every baseline lesion in its report, and exactly one SEG, one TID 1500 SR and at most one
OHIF measurements SR back in Orthanc. The time from the first follow-up's upload to the last result is printed and
written to ``guide_timings.json`` in the test's folder (a figure, not an assertion)."""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from lesiontrack.db.models import JobState
from tests.support.e2e_site import sr_uids
from tests.support.pacs_guide import GuideSite
from tests.support.services import wait_for

pytestmark = [pytest.mark.services, pytest.mark.slow]


# -- the radiologist's RECIST lines ---------------------------------------------------------------------------------
def recist_sr(patient: Any, dest: Path) -> Path:
    """A reader's TID 1500 SR on the baseline: per lesion a long axis and a short axis POLYLINE on the slice where
    the lesion is largest (OHIF's bidirectional measurement), under the lesion's Tracking UID and name. No SEG."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from lesiontrack.models.imaging.dicom_read import read_series
    from lesiontrack.pipeline.dicom.seg.reader import read_seg

    ct = read_series(patient.baseline.files)
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in patient.baseline.files]
    by_z = {round(float(d.ImagePositionPatient[2]), 2): d for d in datasets}
    groups = []
    for segment in read_seg(patient.seg_file, ct).segments:
        m = np.asarray(segment.mask.array) > 0
        assert m.shape == ct.shape
        k = int(np.argmax(m.sum(axis=(1, 2))))
        sl = np.argwhere(m[k])
        (j0, i0), (j1, i1) = sl.min(0), sl.max(0)
        ds = by_z[round(float(ct.index_to_patient([0, 0, k])[2]), 2)]
        src = hd.sr.SourceImageForRegion(ds.SOPClassUID, ds.SOPInstanceUID)
        cx, cy = (i0 + i1) / 2 + 0.5, (j0 + j1) / 2 + 0.5
        horiz = np.array([[i0 + 0.5, cy], [i1 + 0.5, cy]], np.float32)
        vert = np.array([[cx, j0 + 0.5], [cx, j1 + 0.5]], np.float32)
        sx, sy = float(ct.spacing[0]), float(ct.spacing[1])
        long_mm, short_mm = (i1 - i0 + 1) * sx, (j1 - j0 + 1) * sy
        if short_mm > long_mm:
            (horiz, long_mm), (vert, short_mm) = (vert, short_mm), (horiz, long_mm)
        meas = [
            hd.sr.Measurement(
                codes.SCT.LongAxis,
                float(long_mm),
                codes.UCUM.Millimeter,
                referenced_coordinates=[hd.sr.CoordinatesForMeasurement("POLYLINE", horiz, src)],
            ),
            hd.sr.Measurement(
                codes.SCT.ShortAxis,
                float(short_mm),
                codes.UCUM.Millimeter,
                referenced_coordinates=[hd.sr.CoordinatesForMeasurement("POLYLINE", vert, src)],
            ),
        ]
        tid = hd.sr.TrackingIdentifier(uid=segment.identity.tracking_uid, identifier=segment.identity.tracking_id)
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(tracking_identifier=tid, measurements=meas))
    observer = hd.sr.ObservationContext(
        observer_person_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Person,
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name="Reader^One"),
        )
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=datasets,
        content=hd.sr.MeasurementReport(observer, codes.LN.CTUnspecifiedBodyRegion, groups),
        series_instance_uid=hd.UID(),
        series_number=300,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Reading workstation",
        series_description="Baseline RECIST measurements",
    )
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "recist_sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


def _check_follow_up(site: GuideSite, fu: Any, base_uids: set[str], prior_series: str, tmp: Path) -> None:
    jobs = site.jobs(fu.series_uid)
    assert len(jobs) == 1, [(j.id, j.state, j.error) for j in jobs]
    job = jobs[0]
    assert job.state is JobState.DONE, job.error
    assert job.attempts == 1, f"analysed only at attempt {job.attempts}"
    from lesiontrack.pipeline.jobs.contract import job_results

    match = job_results(job.step_outputs).match
    assert match is not None
    assert match.prior.ct_series_uid == prior_series
    objs = site.results_in_orthanc(fu.study_uid)
    counts = {k: len(v) for k, v in objs.items()}
    assert counts.get(901) == 1, counts
    assert counts.get(902) == 1, counts
    assert counts.get(903, 0) <= 1, counts
    assert set(counts) <= {901, 902, 903}, counts
    reported = sr_uids(objs[902][0])
    assert base_uids <= reported, f"baseline lesions missing from the report: {base_uids - reported}"


def _run_patient(site: GuideSite, patient: Any, prior_annotation: Path, tmp: Path) -> float:
    base_uids = {les["tracking_uid"] for les in patient.lesions}
    site.upload([*patient.baseline.files, prior_annotation])  # the import: no earlier study, not routed
    t0 = time.monotonic()
    for fu in patient.followups:
        site.upload(fu.files)  # Orthanc routes each one when it is stable (the guide's Lua)
    for fu in patient.followups:
        series_uid, study_uid = fu.series_uid, fu.study_uid
        wait_for(partial(site.finished, series_uid), 900, f"the analysis of {series_uid}")
        wait_for(partial(site.delivered, study_uid), 300, f"the results of {series_uid} in Orthanc")
    elapsed = time.monotonic() - t0
    for fu in patient.followups:
        _check_follow_up(site, fu, base_uids, patient.baseline.series_uid, tmp)
    skipped = {s["series_instance_uid"]: s["routing_reason"] for s in site.api("/api/series?state=skipped")["items"]}
    routed = {fu.series_uid for fu in patient.followups}
    assert not routed & set(skipped), {u: skipped[u] for u in routed & set(skipped)}
    # the baseline was never routed by the script: it reached LesionTrack only as a retrieved prior
    base = site.api(f"/api/series/{patient.baseline.series_uid}")
    assert base["routing_reason"].startswith("retrieved as prior"), base
    assert base["jobs"] == [], base
    return elapsed


def test_the_orthanc_guide_as_written_two_patients_three_follow_ups(tmp_path: Path) -> None:
    from lesiontrack.demo_data import FollowUps, make_patient

    small = {
        "shape": (40, 80, 80),
        "spacing": (3.0, 3.0, 3.0),
        "n_lesions": 3,
        "n_followups": 3,
        "follow_ups": FollowUps.MOTION,
    }
    chest = make_patient(tmp_path / "seg-patient", seed=5, **small)
    abdomen = make_patient(tmp_path / "sr-patient", seed=8, **small)
    lines = recist_sr(abdomen, tmp_path / "sr-patient" / "baseline_sr")
    site = GuideSite(tmp_path)
    try:
        timings = {
            "baseline SEG patient": _run_patient(site, chest, chest.seg_file, tmp_path),
            "baseline SR lines patient": _run_patient(site, abdomen, lines, tmp_path),
        }
        from lesiontrack.pipeline.jobs.contract import job_results

        sr_job = site.jobs(abdomen.followups[0].series_uid)[0]
        match = job_results(sr_job.step_outputs).match
        assert match is not None, "prompted from the reader's lines"
        assert match.prior.annotation.modality == "SR", "prompted from the reader's lines"
    finally:
        site.stop()
    (tmp_path / "guide_timings.json").write_text(json.dumps(timings, indent=1))
    print(f"\nfirst follow-up uploaded -> last result in Orthanc, per patient (3 follow-ups): {timings}")
