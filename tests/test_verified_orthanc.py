"""Verified tracking through a real Orthanc (issue 16): baseline + SEG and follow-ups 1–2 are analysed; a
radiologist's corrected SEG of follow-up 1 — written by another tool (highdicom, Manufacturer "OtherViewer"), one
lesion edited, one deleted, one added — is stored in Orthanc and routed to LesionTrack like any series. LesionTrack
issues new SEG + SR for follow-up 1 (adopted) and follow-up 2 (re-analysed from the correction) into Orthanc; the
test reads them back: the deleted lesion is gone, the added one is tracked at follow-up 2 under its Tracking UID, the
edited one's follow-up-2 result is derived from the correction, nothing was overwritten, audit rows exist, and the
new objects validate (dciodvfy, pixelmed).

A lesion appears at follow-up 1 (and stays) that nothing marks until the reader adds it; the new-lesion search is
off here so that the reader's addition, not a candidate, brings it in (candidates kept by a reader are covered by
tests/test_verified_tracking.py's matching).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from lesiontrack.db.models import AuditEvent, Lesion, LesionObservation, TimepointVerification, VerificationState
from lesiontrack.db.session import session_scope
from lesiontrack.pipeline.jobs.contract import job_results
from tests.support.correction import READER, write_correction
from tests.support.e2e_site import Site, get_bytes, validate_object
from tests.support.services import wait_for

pytestmark = [pytest.mark.services, pytest.mark.slow]


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from lesiontrack.demo_data import FollowUps, make_patient

    new = [("liver", 14.0, 25.0)]
    return make_patient(
        tmp_path_factory.mktemp("patient"),
        seed=5,
        shape=(56, 112, 112),
        spacing=(3.0, 3.0, 3.0),
        n_lesions=3,
        n_followups=2,
        # registration 'none' keeps this test short; tracking under motion: tests/test_e2e_orthanc.py
        follow_ups=FollowUps.STILL,
        new_lesions={1: new, 2: new},
    )


def _objects(site: Site, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    return site.results_in_orthanc(study_uid)


def _newer_job_done(site: Site, series_uid: str, after: int, timeout: float = 600) -> Any:
    store = site.service.job_store

    def done() -> bool:
        view = store.latest_for_series(series_uid)
        return view is not None and view.id > after and view.finished

    wait_for(done, timeout, f"a new analysis of {series_uid}")
    return site.analyse(series_uid)  # waits for its delivery to Orthanc too


def test_verified_correction_through_orthanc(tmp_path: Path, patient: Any) -> None:
    site = Site(tmp_path, "C-MOVE", detection={"new_lesions": False}, engines={"registration": "none"})
    try:
        fu1, fu2 = patient.followups
        site.upload([*patient.baseline.files, patient.seg_file])
        first = []
        for fu in (fu1, fu2):
            site.route(site.upload(fu.files))
            first.append(site.analyse(fu.series_uid))
        ours = _objects(site, fu1.study_uid)["SEG"]
        assert len(ours) == 1
        our_seg = tmp_path / "our_fu1_seg.dcm"
        ours[0].save_as(our_seg, enforce_file_format=True)
        corr = write_correction(
            our_seg, fu1.files, tmp_path / "correction", add_centre_mm=patient.truth["new_lesions"][0]["centre_mm"]
        )
        # the reader stores the correction in the PACS, which routes it to LesionTrack like any series
        site.route(site.upload([corr.path]))
        adopted = _newer_job_done(site, fu1.series_uid, first[0].id)
        reanalysed = _newer_job_done(site, fu2.series_uid, first[1].id)

        sf = site.service.session_factory
        with session_scope(sf) as s:
            v = s.scalar(select(TimepointVerification))
            assert v is not None
            assert v.state is VerificationState.APPLIED
            assert v.verified_by == READER
            assert v.job_pk == adopted.id
            assert v.reanalysis_jobs == [reanalysed.id]
            lesions = {les.tracking_uid: les for les in s.scalars(select(Lesion))}
            assert lesions[corr.deleted_uid].retired_at_series_uid == fu1.series_uid
            edited = lesions[corr.edited_uid].id
            fu2_obs = s.scalar(
                select(LesionObservation).where(
                    LesionObservation.lesion_pk == edited,
                    LesionObservation.series_instance_uid == fu2.series_uid,
                    LesionObservation.job_pk == reanalysed.id,
                )
            )
            assert fu2_obs is not None
            assert fu2_obs.propagated_from_sop_uid == corr.sop_instance_uid
            actions = {a for (a,) in s.execute(select(AuditEvent.action))}
        assert {"verification.received", "verification.applied", "lesion.retired", "verification.reanalysis"} <= actions

        # read back from Orthanc: both revisions of each follow-up are there, the new ones say so
        srs = []
        for fu, job, old in ((fu1, adopted, first[0]), (fu2, reanalysed, first[1])):
            objs = _objects(site, fu.study_uid)
            written = job_results(job.step_outputs).written
            old_written = job_results(old.step_outputs).written
            assert written is not None
            assert old_written is not None
            segs = {str(d.SOPInstanceUID): d for d in objs["SEG"]}
            srs_in = {str(d.SOPInstanceUID): d for d in objs["SR"]}
            assert {written.seg_sop_instance_uid, old_written.seg_sop_instance_uid} <= set(segs), "nothing overwritten"
            assert {written.sr_sop_instance_uid, old_written.sr_sop_instance_uid} <= set(srs_in)
            new_seg, new_sr = segs[written.seg_sop_instance_uid], srs_in[written.sr_sop_instance_uid]
            assert "rev2" in str(new_seg.SeriesDescription)
            assert "rev1" in str(segs[old_written.seg_sop_instance_uid].SeriesDescription)
            pred = new_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
            assert str(pred.ReferencedSOPInstanceUID) == old_written.sr_sop_instance_uid
            tracked = {str(x.TrackingUID) for x in new_seg.SegmentSequence}
            assert corr.deleted_uid not in tracked
            assert corr.added_uid in tracked
            assert corr.edited_uid in tracked
            validate_object(tmp_path, new_seg)
            srs.append(validate_object(tmp_path, new_sr))
        from lesiontrack.pipeline.dicom.validate import run_sr_validator

        for rep in run_sr_validator(srs):
            assert rep.ok, rep.summary()
        # the correction itself is in Orthanc and in our store, untouched
        found = site.orthanc.post("/tools/lookup", corr.sop_instance_uid)
        raw = get_bytes(site.orthanc, f"/instances/{found[0]['ID']}/file")
        assert str(pydicom.dcmread(io.BytesIO(raw)).Manufacturer) == "OtherViewer"
    finally:
        site.stop()
