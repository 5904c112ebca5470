"""End to end against a real Orthanc: the PACS routes a follow-up to LesionTrack, which finds and retrieves the
prior (C-MOVE in one test, C-GET in the other), tracks, and stores SEG + SR back in Orthanc. The test reads them
back from Orthanc, validates them (dciodvfy, pixelmed DicomSRValidator, dsrdump) and checks each lesion keeps the
prior SEG's Tracking UID; a second follow-up is again propagated from the radiologist's baseline SEG (LesionTrack's
own SEG of the first follow-up is found and passed over) and every observation records that provenance.

The whole service (SCP, job executor, sender) runs embedded in the test process with the real analysis steps on a
small phantom patient (patient motion between timepoints).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from lesiontrack.db.models import AuditEvent, LesionObservation
from lesiontrack.db.session import session_scope
from lesiontrack.pipeline.jobs.contract import job_results
from tests.support.e2e_site import Site, sr_uids, validate_object

pytestmark = [pytest.mark.services, pytest.mark.slow]


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory):
    from lesiontrack.demo_data import FollowUps, make_patient

    return make_patient(
        tmp_path_factory.mktemp("patient"),
        seed=5,
        shape=(56, 112, 112),
        spacing=(3.0, 3.0, 3.0),
        n_lesions=3,
        n_followups=2,
        follow_ups=FollowUps.MOTION,
    )


def _segment_uids(seg: pydicom.Dataset) -> dict[str, str]:
    return {str(s.TrackingUID): str(s.TrackingID) for s in seg.SegmentSequence}


def _run_chain(site: Site, patient: Any, tmp: Path, followups: int) -> list[Path]:
    srs: list[Path] = []
    base_uids = {les["tracking_uid"] for les in patient.lesions}
    site.upload([*patient.baseline.files, patient.seg_file])  # the baseline and its SEG live in the PACS
    previous_seg: str | None = None
    for fu in patient.followups[:followups]:
        site.route(site.upload(fu.files))
        view = site.analyse(fu.series_uid)
        results = job_results(view.step_outputs)
        assert results.match is not None
        assert results.written is not None
        prior = results.match.prior
        baseline_seg = str(pydicom.dcmread(patient.seg_file, stop_before_pixels=True).SOPInstanceUID)
        # every follow-up is propagated from the radiologist's baseline SEG, never from our previous result
        assert prior.ct_series_uid == patient.baseline.series_uid
        assert prior.annotation.sop_instance_uid == baseline_seg
        if previous_seg is None:
            assert prior.source == "orthanc"
        else:  # our SEG of the previous follow-up was found, and passed over as a prompt source
            assert results.match.prompt_source is not None
            assert previous_seg in results.match.prompt_source.skipped_ours
        with session_scope(site.service.session_factory) as s:
            obs = s.scalars(select(LesionObservation).where(LesionObservation.series_instance_uid == fu.series_uid))
            prov = {(o.propagated_from_series_uid, o.propagated_from_sop_uid) for o in obs}
        assert prov == {(patient.baseline.series_uid, baseline_seg)}, "provenance recorded on every observation"
        objs = site.results_in_orthanc(fu.study_uid)
        # SEG, the TID 1500 report and the OHIF measurements SR (pipeline.dicom.sr.viewer)
        reports = [d for d in objs.get("SR", []) if int(d.SeriesNumber) == 902]
        viewer = [d for d in objs.get("SR", []) if int(d.SeriesNumber) == 903]
        counts = {k: len(v) for k, v in objs.items()}
        assert len(objs.get("SEG", [])) == 1, counts
        assert len(reports) == 1, counts
        assert len(viewer) == 1, counts
        assert len(objs["SR"]) == 2, counts
        seg, sr = objs["SEG"][0], reports[0]
        validate_object(tmp, seg)
        srs.append(validate_object(tmp, sr))
        srs.append(validate_object(tmp, viewer[0]))
        assert str(viewer[0].SOPInstanceUID) == results.written.viewer_sr_sop_instance_uid
        # unconfirmed new-lesion candidates carry Tracking UIDs of their own (labelled as such); the rest are ours
        segments = _segment_uids(seg)
        candidates = {uid for uid, tid in segments.items() if tid.startswith("Candidate ")}
        assert candidates == {c.tracking_uid for c in results.detect.candidates} if results.detect else not candidates
        assert set(segments) - candidates <= base_uids
        assert len(set(segments) - candidates) >= 1
        assert sr_uids(sr) - candidates == base_uids, "every baseline lesion is reported under its own Tracking UID"
        assert sr_uids(viewer[0]) <= set(segments), "the OHIF SR names lesions by their own Tracking UIDs only"
        assert str(seg.SOPInstanceUID) == results.written.seg_sop_instance_uid
        previous_seg = str(seg.SOPInstanceUID)
    return srs


def test_e2e_orthanc_c_move_two_followups(tmp_path: Path, patient: Any) -> None:
    site = Site(tmp_path, "C-MOVE")
    try:
        srs = _run_chain(site, patient, tmp_path, followups=2)
        from lesiontrack.pipeline.dicom.validate import run_sr_validator

        for rep in run_sr_validator(srs):
            assert rep.ok, rep.summary()
        with session_scope(site.service.session_factory) as s:
            methods = [
                e.details["method"] for e in s.scalars(select(AuditEvent).where(AuditEvent.action == "priors.retrieve"))
            ]
        assert methods
        assert set(methods) == {"C-MOVE"}
    finally:
        site.stop()


def test_e2e_orthanc_c_get(tmp_path: Path, patient: Any) -> None:
    site = Site(tmp_path, "C-GET")
    try:
        _run_chain(site, patient, tmp_path, followups=1)
        with session_scope(site.service.session_factory) as s:
            methods = [
                e.details["method"] for e in s.scalars(select(AuditEvent).where(AuditEvent.action == "priors.retrieve"))
            ]
        assert methods
        assert set(methods) == {"C-GET"}
    finally:
        site.stop()
