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

from functools import partial
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from lesiontrack.db.models import JobState, Patient
from lesiontrack.db.session import session_scope
from lesiontrack.models.imaging.dicom_read import read_series
from tests.support.lost_lesion import arrow_gsps, lost_lesion, move, overlap
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


def test_a_gsps_arrow_saved_to_orthanc_on_an_analysed_follow_up_re_finds_the_lost_lesion(tmp_path: Path) -> None:
    patient = still_patient(tmp_path / "patient", n_followups=1)
    fu = patient.followups[0]
    move(fu.files)
    lost = lost_lesion(patient)
    fu_ct = read_series(fu.files)
    site = GuideSite(tmp_path / "site", analysis=NO_REGISTRATION)
    try:
        site.upload([*patient.baseline.files, patient.seg_file])  # the baseline with its annotation: not routed
        site.upload(fu.files)  # routed by the guide's Lua when stable
        [first] = wait_for(partial(_jobs_done, site, fu.series_uid, 1), 900, "the follow-up's analysis")
        assert first.state is JobState.DONE, first.error
        before = wait_for(partial(_results, site, fu.study_uid, 1), 300, "the first SEG + SR in Orthanc")
        old_seg, old_sr = before[901][0], before[902][0]
        old_seg.save_as(tmp_path / "old_seg.dcm")
        assert overlap(tmp_path / "old_seg.dcm", lost, fu_ct) < 0.2, "tracking lost the lesion"

        # the radiologist's arrow on it, saved to the PACS on the follow-up study
        gsps = arrow_gsps(fu.files, lost, tmp_path / "pr" / "arrow.dcm")
        header = pydicom.dcmread(gsps, stop_before_pixels=True)
        assert header.StudyInstanceUID == fu.study_uid
        site.upload([gsps])
        jobs = wait_for(partial(_jobs_done, site, fu.series_uid, 2), 900, "the re-analysis of the follow-up")
        after = wait_for(partial(_results, site, fu.study_uid, 2), 300, "the new SEG + SR in Orthanc")
        routed = _routed_by_orthanc(site)
        api_first = site.api(f"/api/jobs/{first.id}")
        with session_scope(site.sf) as s:
            patient_pk = s.scalar(select(Patient.id))
        verifications = site.api(f"/api/patients/{patient_pk}/verifications")
    finally:
        site.stop()

    again = max(jobs, key=lambda j: j.id)
    assert len(jobs) == 2, [(j.id, j.state, j.error) for j in jobs]
    assert again.state is JobState.DONE, again.error
    # Orthanc routed the follow-up CT and the person's GSPS; never a SEG or SR of ours
    assert routed == {fu.series_uid, str(header.SeriesInstanceUID)}, routed
    # new instances in Orthanc beside the old ones; the old job superseded by the re-analysis
    segs = {str(d.SOPInstanceUID): d for d in after[901]}
    srs = {str(d.SOPInstanceUID) for d in after[902]}
    assert str(old_seg.SOPInstanceUID) in segs
    assert str(old_sr.SOPInstanceUID) in srs
    [new_uid] = set(segs) - {str(old_seg.SOPInstanceUID)}
    assert len(srs) == 2, srs
    assert api_first["state"] == "superseded"
    assert api_first["superseded_by"] == again.id
    [v] = verifications
    assert v["method"] == "annotation"
    assert f"GSPS {header.SOPInstanceUID}" in v["reason"]
    assert f"arrived on study {fu.study_uid}" in v["reason"]
    # the lesion re-found from the arrow, in the SEG Orthanc holds
    segs[new_uid].save_as(tmp_path / "new_seg.dcm")
    assert overlap(tmp_path / "new_seg.dcm", lost, fu_ct) > 0.6, "re-found from the arrow"
