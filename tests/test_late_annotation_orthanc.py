"""A radiologist's arrow saved to the PACS on an analysed follow-up re-finds the lesion tracking lost (issue 31 item 3,
"through the PACS").

Orthanc, its routing script and LesionTrack are set up from docs/pacs/orthanc.md as written
(tests/support/pacs_guide; ``lesiontrack serve`` as a subprocess) — only the analysis is told not to register, so
that the moved follow-up loses a lesion (tests/support/lost_lesion). The baseline CT and its SEG are imported into
Orthanc; the follow-up is uploaded, routed by the guide's Lua, analysed, and its SEG + SR stored back: the largest
lesion is lost. Then the radiologist's GSPS with an arrow on that lesion is stored into Orthanc on the follow-up
study. The guide's Lua routes it (a person's annotation on a patient LesionTrack analysed) and fires the completion
trigger; LesionTrack takes it in (method ``annotation``) and re-analyses the follow-up: a NEW SEG and SR arrive in
Orthanc beside the old ones, the old job is superseded (API), the lesion is re-found there. LesionTrack's own SEG and
SR were never routed back (Orthanc's store jobs name only the follow-up CT and the GSPS series).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from lesiontrack.db.models import JobState, Patient
from lesiontrack.db.session import session_scope
from lesiontrack.models.imaging.dicom_read import read_series
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.pipeline.jobs.contract import WriteSegSrOutput, read_output
from tests.support.lost_lesion import LostLesion, arrow_gsps, lost_lesion, move, overlap
from tests.support.pacs_guide import GuideSite
from tests.support.patient import still_patient
from tests.support.services import wait_for

pytestmark = [pytest.mark.services, pytest.mark.slow]

NO_REGISTRATION = {"engines": {"registration": "none"}, "detection": {"new_lesions": False}}


def _results(site: GuideSite, study_uid: str, n: int) -> dict[int, list[pydicom.Dataset]]:
    """Our objects in the study once ``n`` SEG and ``n`` TID 1500 SR instances are there (empty before; counted
    from Orthanc's series listing, downloaded only then)."""
    [study] = site.orthanc.post("/tools/lookup", study_uid)
    counts: dict[int, int] = {}
    for s in site.orthanc.get_json(f"/studies/{study['ID']}/series"):
        number = int(s["MainDicomTags"].get("SeriesNumber", 0))
        counts[number] = counts.get(number, 0) + len(s["Instances"])
    return site.results_in_orthanc(study_uid) if counts.get(901, 0) >= n and counts.get(902, 0) >= n else {}


def _jobs_done(site: GuideSite, series_uid: str, n: int) -> list[Any]:
    jobs = site.jobs(series_uid)
    return jobs if len(jobs) >= n and all(j.finished for j in jobs) else []


def _routed_by_orthanc(site: GuideSite) -> set[str]:
    """The SeriesInstanceUIDs Orthanc's store jobs sent to LesionTrack (the Lua's routing)."""
    out = set()
    for job in site.orthanc.get_json("/jobs?expand"):
        if job["Type"] != "DicomModalityStore":
            continue
        for resource in job["Content"].get("ParentResources", []):
            out.add(site.orthanc.get_json(f"/series/{resource}")["MainDicomTags"]["SeriesInstanceUID"])
    return out


@dataclass
class _Run:
    """What a run left: the follow-up's jobs (oldest first), our objects in Orthanc, what Orthanc routed, the API."""

    fu_ct: Volume
    lost: LostLesion
    gsps: pydicom.Dataset
    jobs: list[Any]
    in_orthanc: dict[int, list[pydicom.Dataset]]
    routed: set[str]
    api_first: dict[str, Any]
    verifications: list[dict[str, Any]]


def _run(tmp_path: Path, *, with_the_ct: bool) -> _Run:
    """The baseline (CT + SEG) imported, the moved follow-up routed and analysed; the radiologist's arrow GSPS saved to
    Orthanc on the follow-up study after our result arrived there, or (``with_the_ct``) with the CT, while
    LesionTrack had no result of the patient yet (the Lua then routes it when our report arrives)."""
    patient = still_patient(tmp_path / "patient", n_followups=1)
    fu = patient.followups[0]
    move(fu.files)
    lost = lost_lesion(patient)
    gsps = arrow_gsps(fu.files, lost, tmp_path / "pr" / "arrow.dcm")
    site = GuideSite(tmp_path / "site", analysis=NO_REGISTRATION)
    try:
        site.upload([*patient.baseline.files, patient.seg_file])  # the baseline with its annotation: not routed
        site.upload([*fu.files, gsps] if with_the_ct else fu.files)  # the CT routed by the guide's Lua when stable
        if not with_the_ct:
            wait_for(partial(_results, site, fu.study_uid, 1), 900, "the first SEG + SR in Orthanc")
            site.upload([gsps])  # the radiologist's arrow, saved to the PACS after reading our result
        jobs = wait_for(partial(_jobs_done, site, fu.series_uid, 2), 900, "the re-analysis of the follow-up")
        in_orthanc = wait_for(partial(_results, site, fu.study_uid, 2), 300, "the new SEG + SR in Orthanc")
        routed = _routed_by_orthanc(site)
        api_first = site.api(f"/api/jobs/{min(j.id for j in jobs)}")
        with session_scope(site.sf) as s:
            patient_pk = s.scalar(select(Patient.id))
        verifications = site.api(f"/api/patients/{patient_pk}/verifications")
    finally:
        site.stop()
    header = pydicom.dcmread(gsps, stop_before_pixels=True)
    assert header.StudyInstanceUID == fu.study_uid
    ordered = sorted(jobs, key=lambda j: j.id)
    return _Run(read_series(fu.files), lost, header, ordered, in_orthanc, routed, api_first, verifications)


def _check(run: _Run, tmp_path: Path) -> None:
    """A new SEG + SR revision in Orthanc beside the old one, the old job superseded, the lesion the first result lost
    re-found from the arrow, the annotation recorded; Orthanc routed the follow-up CT and the GSPS, nothing of ours."""
    assert len(run.jobs) == 2, [(j.id, j.state, j.error) for j in run.jobs]
    first, again = run.jobs
    assert first.state is JobState.SUPERSEDED
    assert again.state is JobState.DONE, again.error
    assert run.routed == {first.followup_series_uid, str(run.gsps.SeriesInstanceUID)}, run.routed
    segs = {str(d.SOPInstanceUID): d for d in run.in_orthanc[901]}
    srs = {str(d.SOPInstanceUID) for d in run.in_orthanc[902]}
    assert len(segs) == 2, segs.keys()
    assert len(srs) == 2, srs
    for job, lost in ((first, True), (again, False)):
        written = read_output(job.step_outputs, WriteSegSrOutput)
        assert written is not None
        assert written.sr_sop_instance_uid in srs, "each revision's SR is in Orthanc"
        seg = segs[str(written.seg_sop_instance_uid)]
        seg.save_as(tmp_path / f"seg-{job.id}.dcm")
        dice = overlap(tmp_path / f"seg-{job.id}.dcm", run.lost, run.fu_ct)
        assert dice < 0.2 if lost else dice > 0.6, (job.id, dice)  # lost by tracking, re-found from the arrow
    assert run.api_first["state"] == "superseded"
    assert run.api_first["superseded_by"] == again.id
    [v] = run.verifications
    assert v["method"] == "annotation"
    assert v["job_id"] == again.id
    assert f"GSPS {run.gsps.SOPInstanceUID}" in v["reason"]
    assert f"arrived on study {run.gsps.StudyInstanceUID}" in v["reason"]


def test_a_gsps_arrow_saved_to_orthanc_on_an_analysed_follow_up_re_finds_the_lost_lesion(tmp_path: Path) -> None:
    _check(_run(tmp_path, with_the_ct=False), tmp_path)


def test_a_gsps_arrow_saved_with_the_follow_up_is_routed_when_our_report_arrives(tmp_path: Path) -> None:
    _check(_run(tmp_path, with_the_ct=True), tmp_path)
