"""Verified tracking (issue 16): a reader's corrected SEG of an analysed follow-up is recognised, adopted (edited
lesion, deleted lesion retired, added lesion tracked and propagated back), and every later follow-up is re-analysed
from it — new SEG + SR instances, the old ones kept and superseded, every step audited; the same SEG twice does
nothing the second time.

The real pipeline runs in-process on a phantom patient (baseline + SEG, two follow-ups on the baseline's position,
registration 'none' keeps it fast); a lesion appears at follow-up 1 and stays at follow-up 2, and nothing marks it
until the reader adds it. The same flow over real Orthanc is tests/test_e2e_orthanc.py::test_verified_correction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from lesiontrack.db.models import (
    AuditEvent,
    JobState,
    Lesion,
    LesionObservation,
    LesionOrigin,
    Patient,
    TimepointVerification,
    VerificationState,
)
from lesiontrack.db.session import make_engine, make_session_factory, session_scope, upgrade
from lesiontrack.db.status import LesionStatus
from lesiontrack.pipeline.dicom.sr.reader import read_sr
from lesiontrack.pipeline.jobs.contract import job_results
from tests.support.correction import READER, write_correction
from tests.support.patient import still_patient

API_KEY = {"X-API-Key": "demo"}


def _run_queued(service: Any, sf: Any) -> list[int]:
    """Run every queued job (oldest first) until none is left; returns their ids."""
    from lesiontrack.db.models import AnalysisJob

    ran: list[int] = []
    while True:
        with session_scope(sf) as s:
            job = s.scalar(select(AnalysisJob.id).where(AnalysisJob.state == JobState.QUEUED).order_by(AnalysisJob.id))
        if job is None:
            return ran
        state = service.run(job)
        assert state is JobState.DONE, service.store.get(job).error
        ran.append(job)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from lesiontrack.demo import demo_settings
    from lesiontrack.dicom_node.inbound.ingest import Ingestor, ingest_file
    from lesiontrack.dicom_node.inbound.scp import storage_root
    from lesiontrack.dicom_node.inbound.storage import InstanceStore
    from lesiontrack.pipeline.jobs.steps import build_pipeline
    from lesiontrack.service import build_analysis_service, build_ports

    tmp = tmp_path_factory.mktemp("verified")
    settings = demo_settings(tmp / "data", http=False, engines={"registration": "none"})
    settings.detection.new_lesions = False  # the reader, not the detector, adds the new lesion here
    upgrade(settings.effective_database_url)
    sf = make_session_factory(make_engine(settings.effective_database_url))
    new = [("liver", 14.0, 25.0)]
    patient = still_patient(tmp / "patient", n_followups=2, new_lesions={1: new, 2: new})
    store = InstanceStore(storage_root(settings), fsync=False)
    ingestor = Ingestor(store, sf)
    files = [*patient.baseline.files, patient.seg_file, *patient.followups[0].files, *patient.followups[1].files]
    for f in files:
        assert ingest_file(ingestor, f).ok
    service = build_analysis_service(settings, sf, build_pipeline, ports=build_ports(settings, sf))
    first = []
    for fu in patient.followups:
        job = service.store.create(fu.series_uid)
        assert service.run(job) is JobState.DONE, service.store.get(job).error
        first.append(service.store.get(job))
    fu1_written = job_results(first[0].step_outputs).written
    assert fu1_written is not None
    assert fu1_written.seg
    added_at = patient.truth["new_lesions"][0]["centre_mm"]
    corr = write_correction(fu1_written.seg, patient.followups[0].files, tmp / "correction", add_centre_mm=added_at)
    assert ingest_file(ingestor, corr.path).ok
    ingestor.close()
    from lesiontrack.pipeline.jobs.verification import take_in_series

    adoption_jobs = take_in_series(sf, settings.verification, corr.series_uid)
    ran = _run_queued(service, sf)
    with session_scope(sf) as s:
        patient_pk = s.scalar(select(Patient.id))
    return {
        "sf": sf,
        "settings": settings,
        "service": service,
        "patient": patient,
        "first": first,
        "correction": corr,
        "adoption_jobs": adoption_jobs,
        "ran": ran,
        "patient_pk": patient_pk,
        "ingestor_store": store,
    }


def _latest_written(site: dict[str, Any], series_uid: str) -> Any:
    latest = site["service"].store.latest_for_series(series_uid)
    assert latest.state is JobState.DONE
    return latest, job_results(latest.step_outputs).written


def _segments(path: str) -> dict[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {str(s.TrackingUID): str(s.SegmentLabel) for s in ds.SegmentSequence}


def test_correction_is_adopted_and_later_follow_ups_reanalysed(site: dict[str, Any]) -> None:
    corr, (fu1, fu2) = site["correction"], site["patient"].followups
    assert len(site["adoption_jobs"]) == 1
    assert site["ran"][0] == site["adoption_jobs"][0], "adoption, then follow-up 2"
    assert len(site["ran"]) == 2, "adoption, then follow-up 2"
    with session_scope(site["sf"]) as s:
        v = s.scalar(select(TimepointVerification))
        assert v is not None
        assert v.state is VerificationState.APPLIED
        assert v.series_instance_uid == fu1.series_uid
        assert v.verified_by == READER
        assert v.reanalysis_jobs == [site["ran"][1]]
        how = {m["tracking_uid"]: m["matched_by"] for m in v.matches or []}
    assert how[corr.edited_uid] == "tracking_uid"
    assert how[corr.added_uid] == "added"
    # follow-up 1: the reader's lesions, new instances
    _job1, w1 = _latest_written(site, fu1.series_uid)
    segs1 = _segments(w1.seg)
    assert corr.deleted_uid not in segs1
    assert corr.added_uid in segs1
    assert corr.edited_uid in segs1
    # follow-up 2: re-analysed from the correction — the added lesion tracked, the deleted one gone
    job2, w2 = _latest_written(site, fu2.series_uid)
    segs2 = _segments(w2.seg)
    assert corr.added_uid in segs2
    assert corr.deleted_uid not in segs2
    assert corr.edited_uid in segs2
    match = job_results(job2.step_outputs).match
    assert match is not None
    assert match.prior.annotations[0].sop_instance_uid == corr.sop_instance_uid
    # nothing overwritten: the first results still exist, and are other instances
    for old, new in ((site["first"][0], w1), (site["first"][1], w2)):
        old_w = job_results(old.step_outputs).written
        assert old_w is not None
        assert Path(old_w.seg).is_file()
        assert Path(old_w.sr).is_file()
        assert old_w.seg_sop_instance_uid != new.seg_sop_instance_uid
        assert old_w.sr_sop_instance_uid != new.sr_sop_instance_uid
        assert site["service"].store.get(old.id).state is JobState.SUPERSEDED
        sr = pydicom.dcmread(new.sr, stop_before_pixels=True)
        assert str(sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
                   .ReferencedSOPInstanceUID) == old_w.sr_sop_instance_uid  # fmt: skip
        desc = str(sr.SeriesDescription)  # the new one carries the mark of what it supersedes
        assert " rev2" in desc
        assert desc.endswith(" supersedes rev1")


def test_observations_provenance_and_lesion_states(site: dict[str, Any]) -> None:
    corr, (fu1, fu2) = site["correction"], site["patient"].followups
    with session_scope(site["sf"]) as s:
        lesions = {les.tracking_uid: les for les in s.scalars(select(Lesion))}
        assert lesions[corr.deleted_uid].retired_at_series_uid == fu1.series_uid
        assert lesions[corr.deleted_uid].retired_by == READER
        added = lesions[corr.added_uid]
        assert added.origin is LesionOrigin.NEW, "not visible at the baseline when propagated back: a new lesion"
        obs = list(s.scalars(select(LesionObservation).where(LesionObservation.superseded_by_job.is_(None))))
        current = {(o.lesion_pk, o.series_instance_uid): o for o in obs}
        edited_fu1 = current[(lesions[corr.edited_uid].id, fu1.series_uid)]
        assert edited_fu1.verification_pk is not None
        assert edited_fu1.propagated_from_sop_uid == corr.sop_instance_uid
        edited_fu2 = current[(lesions[corr.edited_uid].id, fu2.series_uid)]
        assert edited_fu2.propagated_from_sop_uid == corr.sop_instance_uid, "derived from the correction"
        assert edited_fu2.propagated_from_series_uid == fu1.series_uid
        assert (lesions[corr.deleted_uid].id, fu2.series_uid) not in current
        superseded = s.scalars(select(LesionObservation).where(LesionObservation.superseded_by_job.is_not(None)))
        assert {o.series_instance_uid for o in superseded} == {fu1.series_uid, fu2.series_uid}, "kept, not deleted"
        actions = [a for (a,) in s.execute(select(AuditEvent.action))]
    for action in (
        "verification.received",
        "verification.applied",
        "lesion.retired",
        "verification.reanalysis",
        "observations.superseded",
    ):
        assert action in actions, action


def test_reports_say_who_verified_and_what_is_derived(site: dict[str, Any]) -> None:
    fu1, fu2 = site["patient"].followups
    _job1, w1 = _latest_written(site, fu1.series_uid)
    _job2, w2 = _latest_written(site, fu2.series_uid)
    sr1, sr2 = read_sr(w1.sr), read_sr(w2.sr)
    prov1 = {
        g.tracking_uid: g.qualitative.get("Result provenance") for g in sr1.groups if "Lesion status" in g.qualitative
    }
    prov2 = {
        g.tracking_uid: g.qualitative.get("Result provenance") for g in sr2.groups if "Lesion status" in g.qualitative
    }
    assert prov1
    assert all(p is not None and p[2] == "Verified by a reader" for p in prov1.values())
    assert prov2
    assert all(p is not None and p[2] == "Propagated from a reader-verified time point" for p in prov2.values())
    ds = pydicom.dcmread(w1.sr)
    names = [
        str(item.get("PersonName", ""))
        for item in ds.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Person Observer Name"
    ]
    assert names == [READER]
    assert sr1.response["Current Response"]["code"] == "PD", "a new lesion the reader added makes progression"


def test_same_correction_twice_does_nothing(site: dict[str, Any]) -> None:
    from lesiontrack.pipeline.jobs.verification import take_in_series

    again = take_in_series(site["sf"], site["settings"].verification, site["correction"].series_uid)
    assert again == []
    with session_scope(site["sf"]) as s:
        assert len(list(s.scalars(select(TimepointVerification)))) == 1
        assert s.scalar(select(AuditEvent.id).where(AuditEvent.action == "verification.duplicate")) is not None


def test_timeline_api_and_dashboard_show_verification(site: dict[str, Any]) -> None:
    from fastapi.testclient import TestClient

    from lesiontrack.pipeline.jobs.store import JobStore
    from lesiontrack.web import JobStoreControl, create_app

    corr, (fu1, _fu2) = site["correction"], site["patient"].followups
    client = TestClient(
        create_app(site["settings"], site["sf"], job_control=JobStoreControl(JobStore(site["sf"]), actor="api"))
    )
    pk = site["patient_pk"]
    tl = client.get(f"/api/patients/{pk}/timeline", headers=API_KEY).json()
    tp1 = next(tp for tp in tl["timepoints"] if tp["series_uid"] == fu1.series_uid)
    assert tp1["verified_by"] == READER
    assert tp1["verified_at"]
    rows = {r["tracking_uid"]: r for r in tl["lesions"]}
    assert rows[corr.deleted_uid]["role"] == "retired"
    cell = rows[corr.edited_uid]["cells"][tp1["index"]]
    assert cell["verified_by"] == READER
    html = client.get(f"/patients/{pk}", headers=API_KEY).text
    assert "verified by Reader^Anna" in html
    listed = client.get(f"/api/patients/{pk}/verifications", headers=API_KEY).json()
    assert [v["source_sop_instance_uid"] for v in listed] == [corr.sop_instance_uid]
    # read-centre exports carry the verification state and timestamps
    import csv
    import io

    rows_csv = list(
        csv.DictReader(io.StringIO(client.get(f"/api/patients/{pk}/export/lesions.csv", headers=API_KEY).text))
    )
    at_fu1 = [r for r in rows_csv if r["series_instance_uid"] == fu1.series_uid]
    assert at_fu1
    assert all(r["timepoint_verified_by"] == READER and r["timepoint_verified_at"] for r in at_fu1)
    assert {r["result_verified_by"] for r in at_fu1} == {READER}
    tr = client.get(f"/api/patients/{pk}/export/cdisc/TR.csv", headers=API_KEY).text
    assert "RADIOLOGIST" in tr
    assert "ALGORITHM" in tr


def test_matching_without_tracking_uids(tmp_path: Path, site: dict[str, Any]) -> None:
    """A viewer that drops our Tracking UIDs: segments are matched by Tracking ID, label, then overlap."""
    from lesiontrack.models.imaging.dicom_read import read_series
    from lesiontrack.pipeline.jobs.adoption import _read_prompts, _segments
    from lesiontrack.pipeline.science.correction_matching import match_correction

    fu1 = site["patient"].followups[0]
    old = job_results(site["first"][0].step_outputs).written
    corr = write_correction(
        old.seg,
        fu1.files,
        tmp_path,
        add_centre_mm=site["patient"].truth["new_lesions"][0]["centre_mm"],
        drop_tracking_uids=True,
    )
    ct = read_series(fu1.files)
    result = match_correction(
        _segments(_read_prompts(corr.path, ct), ct, set()), _segments(_read_prompts(Path(old.seg), ct), ct, set())
    )
    how = {m.tracking_uid: m.matched_by.value for m in result.matches}
    assert how[corr.edited_uid] == "label"
    assert sorted(how.values()) == ["added", "label", "overlap"]
    assert [d.tracking_uid for d in result.deleted] == [corr.deleted_uid]


def test_operator_mode_and_listed_aes(tmp_path: Path, site: dict[str, Any]) -> None:
    """Corrections from AEs not listed are refused (visibly); with reanalyse_later = operator nothing is queued
    until an operator asks."""
    from lesiontrack.dicom_node.inbound.ingest import Ingestor, ingest_file
    from lesiontrack.dicom_node.inbound.scp import storage_root
    from lesiontrack.dicom_node.inbound.storage import InstanceStore
    from lesiontrack.pipeline.jobs.verification import reanalyse_later, take_in_series

    settings, sf = site["settings"], site["sf"]
    fu1 = site["patient"].followups[0]
    old = job_results(site["first"][0].step_outputs).written
    corr = write_correction(
        old.seg, fu1.files, tmp_path, add_centre_mm=site["patient"].truth["new_lesions"][0]["centre_mm"]
    )
    ingestor = Ingestor(InstanceStore(storage_root(settings), fsync=False), sf)
    assert ingest_file(ingestor, corr.path, calling_ae="WORKSTATION9").ok
    ingestor.close()
    only_pacs = settings.verification.model_copy(update={"accept_from_aes": ["PACS"]})
    assert take_in_series(sf, only_pacs, corr.series_uid) == []
    from lesiontrack.db.models import Series

    with session_scope(sf) as s:
        reason = s.scalar(select(Series.routing_reason).where(Series.series_instance_uid == corr.series_uid))
        assert reason is not None
        assert "WORKSTATION9" in reason
        assert "accept_from_aes" in reason
        assert s.scalar(select(AuditEvent.id).where(AuditEvent.action == "verification.refused")) is not None
        vid = s.scalar(select(TimepointVerification.id))
    waiting = settings.verification.model_copy(update={"reanalyse_later": "operator"})
    assert reanalyse_later(sf, vid, actor="worker", settings=waiting) == []
    with session_scope(sf) as s:
        assert s.scalar(select(AuditEvent.id).where(AuditEvent.action == "verification.reanalysis_waiting"))


def test_verify_as_is_and_upload_need_the_node(site: dict[str, Any]) -> None:
    from fastapi.testclient import TestClient

    from lesiontrack.pipeline.jobs.store import JobStore
    from lesiontrack.pipeline.jobs.verification import verified_sop_uids
    from lesiontrack.web import JobStoreControl, create_app

    fu2 = site["patient"].followups[1]
    client = TestClient(
        create_app(site["settings"], site["sf"], job_control=JobStoreControl(JobStore(site["sf"]), actor="api"))
    )
    r = client.post(f"/api/series/{fu2.series_uid}/verify", headers=API_KEY)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["jobs"] == [], "nothing after the last follow-up to re-analyse"
    _job2, w2 = _latest_written(site, fu2.series_uid)
    with session_scope(site["sf"]) as s:
        assert verified_sop_uids(s, [w2.seg_sop_instance_uid]) == {w2.seg_sop_instance_uid}
    again = client.post(f"/api/series/{fu2.series_uid}/verify", headers=API_KEY).json()
    assert again["verification_id"] == body["verification_id"], "idempotent"
    assert client.post("/api/series/1.2.3.999/verify", headers=API_KEY).status_code == 409
    up = client.post("/api/corrections", headers={**API_KEY, "Content-Type": "application/dicom"}, content=b"x")
    assert up.status_code == 503
    assert "DICOM node" in up.json()["detail"]


def test_upload_through_the_node_is_taken_in(tmp_path: Path, site: dict[str, Any]) -> None:
    """The service's upload path stores the file like a received instance and queues its adoption; bad bytes are
    refused with the reason."""
    from lesiontrack.pipeline.jobs.store import JobStore
    from lesiontrack.service import JobControl

    fu1 = site["patient"].followups[0]
    old = job_results(site["first"][0].step_outputs).written
    corr = write_correction(
        old.seg, fu1.files, tmp_path, add_centre_mm=site["patient"].truth["new_lesions"][0]["centre_mm"]
    )
    submitted: list[int] = []
    control = JobControl(JobStore(site["sf"]), submitted.append, settings=site["settings"], session_factory=site["sf"])
    taken = control.take_correction(corr.path.read_bytes(), "operator:alice")
    assert taken.jobs
    assert submitted == taken.jobs
    assert taken.sop_instance_uid == corr.sop_instance_uid
    with session_scope(site["sf"]) as s:
        v = s.scalar(
            select(TimepointVerification).where(TimepointVerification.source_sop_instance_uid == corr.sop_instance_uid)
        )
        assert v is not None
        assert v.verified_by == READER
        assert v.job_pk == taken.jobs[0]
    with pytest.raises(ValueError, match="not stored"):
        control.take_correction(b"not dicom at all", "operator:alice")


@pytest.mark.slow
@pytest.mark.services
def test_ohif_loads_the_reissued_results_and_tells_them_apart(tmp_path: Path, site: dict[str, Any]) -> None:
    """OHIF (browser): follow-up 2's re-issued SEG and SR load; the superseded revision is listed beside them under
    its own series description (rev1), the current one says rev2."""
    from tests.support.ohif import OhifExpectation, run_ohif_check

    fu2 = site["patient"].followups[1]
    old = job_results(site["first"][1].step_outputs).written
    job2, new = _latest_written(site, fu2.series_uid)
    assert old is not None
    assert new is not None
    descriptions = {
        str(pydicom.dcmread(f, stop_before_pixels=True).SeriesDescription): f
        for f in (old.seg, old.sr, new.seg, new.sr)
    }
    assert len(descriptions) == 4, f"every revision has its own series description: {list(descriptions)}"
    new_seg = pydicom.dcmread(new.seg, stop_before_pixels=True)
    new_sr = pydicom.dcmread(new.sr, stop_before_pixels=True)
    labels = [str(s.SegmentLabel) for s in new_seg.SegmentSequence]
    measured = job_results(job2.step_outputs).measure
    assert measured is not None
    volumes = [
        f"Volume: {m.measurement.volume_ml:.2f} ml"
        for m in measured.lesions
        if m.measurement.status is not LesionStatus.VANISHED
    ][:1]
    rev1 = [d for d in descriptions if "rev1" in d and "supersedes" not in d]  # the new ones name what they supersede
    result, code = run_ohif_check(
        tmp_path,
        [*fu2.files, Path(old.seg), Path(old.sr), Path(new.seg), Path(new.sr)],
        fu2.study_uid,
        OhifExpectation(
            seg=str(new_seg.SeriesDescription),
            sr=str(new_sr.SeriesDescription),
            labels=labels,
            sr_texts=volumes,
            also_listed=rev1,
        ),
    )
    assert result["labelsFound"] == labels, result["labelsMissing"]
    assert sorted(result["listedFound"]) == sorted(rev1), result["listedMissing"]
    assert result["srTextsFound"] == volumes, (
        result["srTextsMissing"],
        result["srPanelText"][-3000:],
        result.get("steps"),
    )
    assert code == 0


def test_cli_lists_verifications(tmp_path: Path, site: dict[str, Any]) -> None:
    from typer.testing import CliRunner

    from lesiontrack.cli import app

    cfg = tmp_path / "lt.toml"
    cfg.write_text(f'database_url = "{site["settings"].effective_database_url}"\ndata_dir = "{tmp_path}"\n')
    res = CliRunner().invoke(app, ["--config", str(cfg), "verify", "list", str(site["patient_pk"])])
    assert res.exit_code == 0, res.output
    assert READER in res.output
    assert "applied" in res.output
    bad = CliRunner().invoke(app, ["--config", str(cfg), "verify", "as-is", "1.2.3.4", "--operator", "bob"])
    assert bad.exit_code == 1
    assert "not analysed" in bad.output


def test_an_annotation_arriving_with_its_ct_is_not_a_correction(site: dict[str, Any]) -> None:
    """A radiologist's SEG that arrives with (or while we analyse) its CT — the baseline's — is a prompt source: no
    verification, no adoption job, whatever state that series' job is in."""
    import pydicom as _pydicom

    from lesiontrack.db.models import AnalysisJob
    from lesiontrack.pipeline.jobs.store import JobStore
    from lesiontrack.pipeline.jobs.verification import take_in_series

    patient = site["patient"]
    job = JobStore(site["sf"]).create(patient.baseline.series_uid, reason="baseline routed with its SEG")
    seg_series = str(_pydicom.dcmread(patient.seg_file, stop_before_pixels=True).SeriesInstanceUID)
    before = _count(site["sf"], TimepointVerification)
    assert take_in_series(site["sf"], site["settings"].verification, seg_series) == []
    assert _count(site["sf"], TimepointVerification) == before
    with session_scope(site["sf"]) as s:
        row = s.get(AnalysisJob, job)
        assert row is not None
        assert row.superseded_by is None
        row.state = JobState.NOTHING_TO_TRACK  # leave the shared database as it was (no queued job)


def _count(sf: Any, model: Any) -> int:
    with session_scope(sf) as s:
        return len(list(s.scalars(select(model))))
