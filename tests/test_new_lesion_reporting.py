"""New lesions are reported only as far as they were looked for, as unconfirmed candidates until an operator
decides: the follow-up's SEG and SR carry them as candidates without RECIST PD; confirming one (audited) re-analyses
the follow-up into a new SEG + SR where it is a tracked new lesion and RECIST says PD; rejecting one (audited)
leaves RECIST as it was and keeps it out of later searches.

The real pipeline runs in-process on a phantom patient whose follow-up has two new lesions (lung, liver) that no
annotation marks; the follow-up lies on the baseline's position so registration engine 'none' keeps it fast (the
detector's accuracy under motion is measured in bench/new_lesions.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from lesiontrack.db.models import AuditEvent, CandidateState, JobState, Lesion, LesionOrigin
from lesiontrack.db.session import session_scope
from lesiontrack.pipeline.dicom.sr.reader import read_sr
from lesiontrack.pipeline.jobs.contract import job_results
from tests.support.patient import still_patient
from tests.support.segsr import content_items
from tests.support.service_site import analyse_first_followup
from tests.support.validators import assert_seg_and_sr_validate

API_KEY = {"X-API-Key": "demo"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from lesiontrack.demo import demo_settings

    tmp = tmp_path_factory.mktemp("newlesions")
    settings = demo_settings(tmp / "data", http=False, engines={"registration": "none"})
    patient = still_patient(
        tmp / "patient", n_followups=1, new_lesions={1: [("lung", 12.0, 30.0), ("liver", 14.0, 20.0)]}
    )
    analysed = analyse_first_followup(settings, patient)
    return {
        "sf": analysed.sf,
        "service": analysed.service,
        "patient": patient,
        "first_job": analysed.job,
        "client": analysed.client,
        "patient_pk": analysed.patient_pk,
    }


def _nearest(candidates: list[dict[str, Any]], centre: list[float]) -> dict[str, Any]:
    return min(candidates, key=lambda c: float(np.linalg.norm(np.subtract(c["centre_mm"], centre))))


def _truth(site: dict[str, Any], organ: str) -> dict[str, Any]:
    return next(t for t in site["patient"].truth["new_lesions"] if t["organ"] == organ)


def test_candidates_are_reported_unconfirmed_and_do_not_make_progression(site: dict[str, Any]) -> None:
    results = job_results(site["first_job"].step_outputs)
    assert results.detect is not None
    assert results.detect.ran
    assert results.written is not None
    assert results.written.sr
    assert results.written.seg
    found = [c.model_dump() for c in results.detect.candidates]
    for organ in ("lung", "liver"):
        truth = _truth(site, organ)
        near = _nearest(found, truth["centre_mm"])
        assert np.linalg.norm(np.subtract(near["centre_mm"], truth["centre_mm"])) < 5.0, (organ, near)
        assert near["tracking_id"] == f"Candidate {found.index(near) + 1} ({organ})", "named by the organ it is in"
        assert near["tissue"] == organ
    sr = read_sr(results.written.sr)
    assert sr.response["New lesions"]["meaning"] == "Unconfirmed candidates (equivocal)"
    assert sr.response["Number of unconfirmed new-lesion candidates"] == len(found)
    assert sr.response["Current Response"]["code"] != "PD", "an equivocal new lesion alone is not progression"
    statuses = {g.tracking_uid: g.qualitative["Lesion status"] for g in sr.groups if "Lesion status" in g.qualitative}
    for c in found:
        assert statuses[c["tracking_uid"]][2] == "Unconfirmed new-lesion candidate"
    seg = pydicom.dcmread(results.written.seg, stop_before_pixels=True)
    labels = {str(s.TrackingUID): str(s.SegmentLabel) for s in seg.SegmentSequence}
    assert all(labels[c["tracking_uid"]].startswith("Candidate ") for c in found)
    # candidates are segments of their own kind: CAD finding codes, one colour, fully automatic
    cand_uids = {c["tracking_uid"] for c in found}
    kinds = {
        str(s.TrackingUID): (
            s.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
            s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            tuple(s.RecommendedDisplayCIELabValue),
            s.SegmentAlgorithmType,
        )
        for s in seg.SegmentSequence
    }
    for uid, (category, kind, _colour, algo) in kinds.items():
        if uid in cand_uids:
            assert (category, algo) == ("404684003", "AUTOMATIC"), kinds[uid]
            assert kind in ("112033", "112062"), kinds[uid]
        else:
            assert (category, kind) == ("49755003", "52988006"), kinds[uid]
    assert len({kinds[uid][2] for uid in cand_uids}) == 1, "every candidate has the one candidate colour"
    assert not {kinds[uid][2] for uid in cand_uids} & {v[2] for u, v in kinds.items() if u not in cand_uids}
    # the dashboard and the API say the same, with the operator's buttons
    client, pk = site["client"], site["patient_pk"]
    tl = client.get(f"/api/patients/{pk}/timeline", headers=API_KEY).json()
    assert tl["timepoints"][1]["new_lesions_text"] == f"{len(found)} unconfirmed candidates"
    html = client.get(f"/patients/{pk}", headers=API_KEY).text
    assert f'class="new-lesions new-unconfirmed-candidates" data-tp="1">{len(found)} unconfirmed candidates' in html
    # the candidate rows sit in one collapsible group per timepoint, its summary says how many
    assert re.search(
        rf'<details class="candidate-group" id="candidates-tp1" data-tp="1" data-count="{len(found)}"', html
    )
    assert f"FU1: {len(found)} candidate{'' if len(found) == 1 else 's'} ({len(found)} unconfirmed)</summary>" in html
    assert len(re.findall(r'action="/candidates/\d+/confirm"', html)) == len(found)
    listed = client.get(f"/api/patients/{pk}/candidates", headers=API_KEY).json()
    assert {c["tracking_uid"] for c in listed} == {c["tracking_uid"] for c in found}
    png = client.get(f"/api/candidates/{listed[0]['id']}/thumbnail.png", headers=API_KEY)
    assert png.status_code == 200
    assert png.content[:4] == b"\x89PNG"


def test_seg_and_sr_with_candidates_validate(site: dict[str, Any]) -> None:
    written = job_results(site["first_job"].step_outputs).written
    assert written is not None
    assert written.seg
    assert written.sr
    assert_seg_and_sr_validate(written.seg, written.sr)


def test_rejecting_a_candidate_keeps_recist_and_is_audited(site: dict[str, Any]) -> None:
    client, pk = site["client"], site["patient_pk"]
    before = client.get(f"/api/patients/{pk}/timeline", headers=API_KEY).json()["timepoints"][1]
    cands = client.get(f"/api/patients/{pk}/candidates", headers=API_KEY).json()
    liver = _nearest(cands, _truth(site, "liver")["centre_mm"])
    r = client.post(f"/api/candidates/{liver['id']}/reject", headers=API_KEY)
    assert r.status_code == 200, r.text
    assert r.json()["candidate"]["state"] == "rejected"
    assert r.json()["job_id"] is None
    assert client.post(f"/api/candidates/{liver['id']}/reject", headers=API_KEY).status_code == 409
    after = client.get(f"/api/patients/{pk}/timeline", headers=API_KEY).json()["timepoints"][1]
    for key in ("overall_response", "target_response", "sum_of_diameters_mm"):
        assert after[key] == before[key]
    assert after["new_lesions_text"] == f"{len(cands) - 1} unconfirmed candidate" + ("s" if len(cands) != 2 else "")
    with session_scope(site["sf"]) as s:
        ev = s.scalar(select(AuditEvent).where(AuditEvent.action == "candidate.rejected"))
        assert ev is not None
        assert ev.object_id == str(liver["id"])
        assert ev.actor.startswith("api")


def test_confirming_a_candidate_tracks_it_and_issues_a_new_sr_with_progression(site: dict[str, Any]) -> None:
    client, pk, service = site["client"], site["patient_pk"], site["service"]
    cands = client.get(f"/api/patients/{pk}/candidates", headers=API_KEY).json()
    lung = _nearest(cands, _truth(site, "lung")["centre_mm"])
    r = client.post(f"/api/candidates/{lung['id']}/confirm", headers={"X-API-Key": "demo"})
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    assert job_id is not None
    assert r.json()["candidate"]["state"] == "confirmed"
    assert service.run(job_id) is JobState.DONE, service.store.get(job_id).error
    first = job_results(site["first_job"].step_outputs).written
    second = job_results(service.store.get(job_id).step_outputs)
    assert first is not None
    assert second.written is not None
    assert second.written.sr
    assert second.detect is not None
    assert second.written.sr != first.sr, "the first SR is kept"
    assert pydicom.dcmread(first.sr).SOPInstanceUID, "the first SR is kept"
    assert lung["tracking_uid"] in second.detect.confirmed_added
    assert second.detect.rejected_excluded == 1
    liver = _truth(site, "liver")["centre_mm"]
    assert all(np.linalg.norm(np.subtract(c.centre_mm, liver)) > 10 for c in second.detect.candidates), (
        "a rejected candidate is not proposed again"
    )
    sr = read_sr(second.written.sr)
    assert sr.response["New lesions"]["meaning"] == "Yes"
    assert sr.response["Current Response"]["code"] == "PD"
    assert first.sr_sop_instance_uid in sr.predecessors
    assert lung["tracking_uid"] in {g.tracking_uid for g in sr.groups}
    with session_scope(site["sf"]) as s:
        lesion = s.scalar(select(Lesion).where(Lesion.tracking_uid == lung["tracking_uid"]))
        assert lesion is not None
        assert lesion.origin is LesionOrigin.NEW
        assert s.scalar(select(AuditEvent).where(AuditEvent.action == "candidate.confirmed")) is not None
    tl = client.get(f"/api/patients/{pk}/timeline", headers=API_KEY).json()
    assert tl["timepoints"][1]["overall_response"] == "PD"
    assert tl["timepoints"][1]["new_lesions_text"] == "yes (confirmed)"
    listed = client.get(f"/api/patients/{pk}/candidates", headers=API_KEY).json()
    states = {c["tracking_uid"]: c["state"] for c in listed}
    assert states[lung["tracking_uid"]] == CandidateState.CONFIRMED.value, "decisions stay visible"
    metrics = client.get("/metrics", headers=API_KEY).text
    assert 'lesiontrack_new_lesion_candidates{state="rejected"} 1.0' in metrics
    assert 'lesiontrack_new_lesion_candidates{state="confirmed"} 1.0' in metrics


def test_a_read_key_cannot_decide(site: dict[str, Any], tmp_path: Any) -> None:
    from fastapi.testclient import TestClient

    from lesiontrack.config.settings import load_settings
    from lesiontrack.web import create_app

    settings = load_settings(
        None, data_dir=tmp_path, http={"api_keys": [{"name": "viewer", "key": "viewer-key", "role": "read"}]}
    )
    client = TestClient(create_app(settings, site["sf"]))
    cands = client.get(f"/api/patients/{site['patient_pk']}/candidates", headers={"X-API-Key": "viewer-key"}).json()
    assert cands, "a read key sees the candidates"
    for decision in ("confirm", "reject"):
        r = client.post(f"/api/candidates/{cands[0]['id']}/{decision}", headers={"X-API-Key": "viewer-key"})
        assert r.status_code == 403, r.text
    assert client.post(f"/api/candidates/{cands[0]['id']}/confirm").status_code == 401
    # the dashboard's buttons post a form: without the session's form token nothing is decided
    forged = site["client"].post(f"/candidates/{cands[0]['id']}/confirm", data={"csrf": "forged"}, headers=API_KEY)
    assert forged.status_code == 403
    assert "form token" in forged.text


@pytest.mark.slow
@pytest.mark.services
def test_ohif_shows_the_candidate_segments_with_their_labels(
    tmp_path_factory: pytest.TempPathFactory, site: dict[str, Any]
) -> None:
    """OHIF (browser): the follow-up's SEG lists the unconfirmed candidates under their labels beside the tracked
    lesions, and the SR loads."""
    from tests.support.ohif import OhifExpectation, run_ohif_check

    written = job_results(site["first_job"].step_outputs).written
    assert written is not None
    assert written.seg
    assert written.sr
    assert written.viewer_sr
    seg = pydicom.dcmread(written.seg, stop_before_pixels=True)
    sr = pydicom.dcmread(written.sr, stop_before_pixels=True)
    viewer = pydicom.dcmread(written.viewer_sr)
    labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    assert any(label.startswith("Candidate ") for label in labels), labels
    # the OHIF measurements SR names every lesion it shows by its SEG label; it shows the tracked lesions only, not
    # the unconfirmed candidates (issue 29: OHIF's tracked-measurements panel is the list of lesions followed)
    named = [str(g.TextValue) for g in content_items(viewer) if g.ConceptNameCodeSequence[0].CodeValue == "121106"]
    assert named, (named, labels)
    assert set(named) <= set(labels), (named, labels)
    assert not any(n.startswith("Candidate ") for n in named), (named, labels)
    fu = site["patient"].followups[0]
    result, code = run_ohif_check(
        tmp_path_factory.mktemp("ohif-candidates"),
        [*fu.files, Path(written.seg), Path(written.sr), Path(written.viewer_sr)],
        fu.study_uid,
        OhifExpectation(
            seg=str(seg.SeriesDescription),
            sr=str(sr.SeriesDescription),
            labels=labels,
            track_sr=str(viewer.SeriesDescription),
            tracked_texts=named,
        ),
    )
    assert result["labelsFound"] == labels, f"segment labels missing in OHIF: {result['labelsMissing']}"
    assert result["trackedMissing"] == [], f"not in OHIF's tracked measurements: {result['trackedMissing']}"
    assert code == 0
