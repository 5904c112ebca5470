"""Issue 31 (A): a radiologist's annotation that arrives *after* the results it changes counts through the service.

A follow-up was analysed and tracking lost a lesion (the patient moved 25 mm, no registration corrects it). Later
the radiologist's GSPS with an arrow on that lesion reaches the DICOM door. The service takes it in through issue
16's verification mechanism (method ``annotation``, not a correction of the whole timepoint) and queues a new
analysis of that follow-up: the lesion is re-found from the arrow, in new SEG/SR instances; the old result is kept
and marked superseded; the job, the API and the verification say why ("GSPS … arrived on study …").

The same arrow arriving while the follow-up's first job is still queued, or running but still finding its priors
(delivered from the job's progress report at ``retrieve_priors``), is read by that job; arriving while it runs after
it read its prompts (at ``register``), a re-analysis supersedes it;
received then but its series completed only after the job finished, the result (issued after it arrived, made
without it) is re-analysed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from bench.drawn_lesions import drawings
from lesiontrack.config.settings import Settings
from lesiontrack.db.models import AuditEvent, JobState, Series, TimepointVerification, VerificationMethod
from lesiontrack.db.session import make_engine, make_session_factory, session_scope, upgrade
from lesiontrack.demo import demo_settings
from lesiontrack.demo_data import DemoPatient
from lesiontrack.dicom_node.inbound.completion import complete_series
from lesiontrack.models.imaging.dicom_read import read_series
from lesiontrack.pipeline.jobs.contract import LoadVolumesOutput, TrackOutput, WriteSegSrOutput, read_output
from lesiontrack.pipeline.jobs.steps import build_pipeline
from lesiontrack.pipeline.jobs.store import JobStore
from lesiontrack.pipeline.jobs.verification import take_in_series
from lesiontrack.service import LesionTrackService, build_analysis_service, build_ports
from lesiontrack.synthetic.annotations import Mark, write_gsps
from lesiontrack.web import JobStoreControl, create_app
from tests.support.dicom_node import pynetdicom_store, wait_until
from tests.support.lost_lesion import LostLesion, arrow_gsps, lost_lesion, move, overlap
from tests.support.patient import still_patient
from tests.support.service_site import ingest

API_KEY = {"X-API-Key": "demo"}


def _latest(analysis: Any, series_uid: str) -> int | None:
    job = analysis.store.latest_for_series(series_uid)
    return None if job is None else int(job.id)


@dataclass
class _Site:
    """A moved follow-up analysed from the baseline's SEG without registration: one lesion lost there."""

    settings: Settings
    sf: sessionmaker[Session]
    analysis: Any  # lesiontrack.service.build_analysis_service's AnalysisService
    patient: DemoPatient
    first: int  # the follow-up's first job
    first_written: WriteSegSrOutput | None  # None: not run yet
    lost: LostLesion  # the baseline's lesion tracking lost, and where it is on the moved follow-up (the truth)


def _moved_followup(tmp_path: Path, progress: Callable[[int, str], None] | None = None) -> _Site:
    """The moved follow-up ingested and complete, its first job queued, not run (``first_written`` None)."""
    settings = demo_settings(tmp_path / "data", http=False, engines={"registration": "none"})
    settings.detection.new_lesions = False
    upgrade(settings.effective_database_url)
    sf = make_session_factory(make_engine(settings.effective_database_url))
    patient = still_patient(tmp_path / "patient", n_followups=1)
    fu = patient.followups[0]
    move(fu.files)
    ingest(settings, sf, [*patient.baseline.files, patient.seg_file, *fu.files])
    with session_scope(sf) as s:  # as they were when the door completed them (no callbacks: the job runs below)
        received = list(s.scalars(select(Series.series_instance_uid)))
    for uid in received:
        complete_series(sf, settings.routing, uid, None, forced=True)
    analysis = build_analysis_service(settings, sf, build_pipeline, ports=build_ports(settings, sf), progress=progress)
    first = analysis.store.create(fu.series_uid)
    return _Site(settings, sf, analysis, patient, first, None, lost_lesion(patient))


def _analysed_moved_followup(tmp_path: Path) -> _Site:
    site = _moved_followup(tmp_path)
    assert site.analysis.run(site.first) is JobState.DONE, site.analysis.store.get(site.first).error
    written = read_output(site.analysis.store.get(site.first).step_outputs, WriteSegSrOutput)
    assert written is not None
    assert written.seg is not None
    fu_ct = read_series(site.patient.followups[0].files)
    assert overlap(written.seg, site.lost, fu_ct) < 0.2, "tracking lost it"
    site.first_written = written
    return site


def _arrow_on_the_lost_lesion(site: _Site, dest: Path) -> Path:
    return arrow_gsps(site.patient.followups[0].files, site.lost, dest)


def _received(site: _Site, path: Path) -> list[int]:
    """``path`` stored and indexed as the door does, its series completed and taken in (the door's annotation
    callback, here in the test's thread); the jobs that queued."""
    ingest(site.settings, site.sf, [path])
    series_uid = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
    complete_series(site.sf, site.settings.routing, series_uid, None, forced=True)
    return take_in_series(site.sf, site.settings.verification, series_uid)


def _through_the_door(site: _Site, path: Path, series_uid: str, before: int | None) -> int:
    """Send ``path`` to the service's DICOM door; the job it queues for ``series_uid`` (``before``: its last)."""
    node = LesionTrackService(site.settings, dicom=True, http=False, jobs=False, upgrade_db=False).start()
    try:
        assert node.scp is not None
        assert pynetdicom_store(node.scp.port, [path]) == [0]
        wait_until(lambda: _latest(site.analysis, series_uid) != before, what="the re-analysis job")
    finally:
        node.stop()
    job = _latest(site.analysis, series_uid)
    assert job is not None
    return job


def test_a_late_gsps_arrow_on_an_analysed_follow_up_re_finds_a_lost_lesion_in_a_new_revision(tmp_path: Path) -> None:
    site = _analysed_moved_followup(tmp_path)
    fu, lost = site.patient.followups[0], site.lost
    # the radiologist's arrow on that lesion, labelled as on the baseline, through the DICOM door
    gsps = _arrow_on_the_lost_lesion(site, tmp_path / "pr" / "arrow.dcm")
    gsps_uid = str(pydicom.dcmread(gsps, stop_before_pixels=True).SOPInstanceUID)
    again = _through_the_door(site, gsps, fu.series_uid, site.first)
    assert site.analysis.store.get(site.first).superseded_by == again
    with session_scope(site.sf) as s:
        v = s.scalar(select(TimepointVerification))
        assert v is not None
        assert v.method is VerificationMethod.ANNOTATION  # a prompt there, not a verification of the timepoint
        assert v.series_instance_uid == fu.series_uid
        assert v.job_pk == again
        patient_pk = v.patient_pk
    assert site.analysis.run(again) is JobState.DONE, site.analysis.store.get(again).error
    # a new revision: new SEG and SR instances, the old ones kept and the old job superseded
    written = read_output(site.analysis.store.get(again).step_outputs, WriteSegSrOutput)
    assert written is not None
    assert written.seg is not None
    old = site.first_written
    assert old is not None
    assert written.seg_sop_instance_uid != old.seg_sop_instance_uid
    assert written.sr_sop_instance_uid != old.sr_sop_instance_uid
    assert all(Path(f).is_file() for f in old.files)
    assert site.analysis.store.get(site.first).state is JobState.SUPERSEDED
    tracked = read_output(site.analysis.store.get(again).step_outputs, TrackOutput)
    assert tracked is not None
    assert {r.tracking_uid: r.status for r in tracked.lesions}[lost.tracking_uid] == "present"
    fu_ct = read_series(fu.files)
    assert overlap(written.seg, lost, fu_ct) > 0.6, "re-found from the arrow"
    # the reason is visible through the API (the job's events, the patient's verifications)
    client = TestClient(create_app(site.settings, site.sf, job_control=JobStoreControl(JobStore(site.sf))))
    job = client.get(f"/api/jobs/{again}", headers=API_KEY).json()
    reason = next(e for e in job["events"] if e["action"] == "job.created")["details"]["reason"]
    assert f"GSPS {gsps_uid}" in reason
    assert f"arrived on study {fu.study_uid}" in reason
    listed = client.get(f"/api/patients/{patient_pk}/verifications", headers=API_KEY).json()
    assert [(x["method"], "arrived on study" in (x["reason"] or "")) for x in listed] == [("annotation", True)]
    # the same object again does nothing; a GSPS arriving late on the baseline re-analyses the follow-up too
    gsps_series = str(pydicom.dcmread(gsps, stop_before_pixels=True).SeriesInstanceUID)
    assert take_in_series(site.sf, site.settings.verification, gsps_series) == []
    _late_gsps_on_the_baseline(site, again, tmp_path)


def _late_gsps_on_the_baseline(site: _Site, latest: int, tmp_path: Path) -> None:
    base, fu = site.patient.baseline, site.patient.followups[0]
    mask = site.lost.prompt.mask
    assert mask is not None
    line = drawings(mask, np.random.default_rng(4))["line"]
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in base.files]
    gsps = write_gsps(heads, [Mark(line, site.lost.prompt.identity.tracking_id)], tmp_path / "pr" / "base.dcm")
    job = _through_the_door(site, gsps, fu.series_uid, latest)
    with session_scope(site.sf) as s:
        created = s.scalars(
            select(AuditEvent).where(AuditEvent.action == "job.created", AuditEvent.object_id == str(job))
        ).one()
        assert created.details is not None
        assert f"arrived on study {base.study_uid}" in created.details["reason"]
        assert s.scalars(select(TimepointVerification)).all()[-1].reanalysis_jobs == [job]


def _refound_by(site: _Site, job: int, gsps_uid: str) -> None:
    """``job`` read the arrow (its load step lists it) and its SEG has the lost lesion where it is."""
    outputs = site.analysis.store.get(job).step_outputs
    loaded, written = read_output(outputs, LoadVolumesOutput), read_output(outputs, WriteSegSrOutput)
    assert loaded is not None
    assert written is not None
    assert written.seg is not None
    assert loaded.followup_annotations == [gsps_uid]
    fu_ct = read_series(site.patient.followups[0].files)
    assert overlap(written.seg, site.lost, fu_ct) > 0.6, "re-found from the arrow"


def _annotation(site: _Site) -> TimepointVerification:
    with session_scope(site.sf) as s:
        v = s.scalar(select(TimepointVerification))
        assert v is not None
        assert v.method is VerificationMethod.ANNOTATION
        s.expunge(v)
        return v


def test_an_arrow_arriving_while_the_first_job_is_queued_is_read_by_that_job(tmp_path: Path) -> None:
    site = _moved_followup(tmp_path)
    gsps = _arrow_on_the_lost_lesion(site, tmp_path / "pr" / "arrow.dcm")
    gsps_uid = str(pydicom.dcmread(gsps, stop_before_pixels=True).SOPInstanceUID)
    assert _received(site, gsps) == [], "no second job: the queued one reads it"
    with session_scope(site.sf) as s:  # a prompt there, as if it had come with the CT: no verification
        assert s.scalar(select(TimepointVerification)) is None
        reason = s.scalar(select(Series.routing_reason).where(Series.modality == "PR"))
    assert f"read by job {site.first} (queued, a prompt there)" in (reason or "")
    assert site.analysis.run(site.first) is JobState.DONE, site.analysis.store.get(site.first).error
    _refound_by(site, site.first, gsps_uid)
    latest = site.analysis.store.latest_for_series(site.patient.followups[0].series_uid)
    assert latest is not None
    assert latest.id == site.first
    # the job says that it arrived and that it read it (API: its events)
    client = TestClient(create_app(site.settings, site.sf, job_control=JobStoreControl(JobStore(site.sf))))
    events = client.get(f"/api/jobs/{site.first}", headers=API_KEY).json()["events"]
    arrived = [e["details"]["reason"] for e in events if e["action"] == "job.annotation_arrived"]
    assert [f"GSPS {gsps_uid}" in r and "it reads it" in r for r in arrived] == [True], arrived


def test_an_arrow_arriving_after_the_running_job_read_its_prompts_queues_a_re_analysis(tmp_path: Path) -> None:
    taken: list[int] = []
    gsps = tmp_path / "pr" / "arrow.dcm"

    def deliver_after_loading(job: int, step: str) -> None:  # the job has read its prompts: the arrow arrives now
        if step == "register" and not gsps.exists():
            _arrow_on_the_lost_lesion(site, gsps)
            taken.extend(_received(site, gsps))

    site = _moved_followup(tmp_path, progress=deliver_after_loading)
    # the running job stops before its next step (nothing written, nothing sent); the re-analysis reads the arrow
    assert site.analysis.run(site.first) is JobState.SUPERSEDED
    [again] = taken
    first = site.analysis.store.get(site.first)
    assert first.superseded_by == again
    assert read_output(first.step_outputs, LoadVolumesOutput) is not None
    assert read_output(first.step_outputs, WriteSegSrOutput) is None
    v = _annotation(site)
    assert v.job_pk == again
    assert f"while job {site.first} was running" in (v.reason or "")
    assert site.analysis.run(again) is JobState.DONE, site.analysis.store.get(again).error
    _refound_by(site, again, str(pydicom.dcmread(gsps, stop_before_pixels=True).SOPInstanceUID))


def test_an_arrow_received_while_the_job_ran_but_completed_after_it_re_analyses_the_result(tmp_path: Path) -> None:
    """The instance arrived after the job read its prompts, its series completed (the quiet period) after the job
    finished: the result was issued after the arrow arrived, yet made without it (its load step does not list it)."""
    gsps = tmp_path / "pr" / "arrow.dcm"

    def receive_after_loading(job: int, step: str) -> None:  # stored and indexed, its series not complete yet
        if step == "register" and not gsps.exists():
            _arrow_on_the_lost_lesion(site, gsps)
            ingest(site.settings, site.sf, [gsps])

    site = _moved_followup(tmp_path, progress=receive_after_loading)
    assert site.analysis.run(site.first) is JobState.DONE, site.analysis.store.get(site.first).error
    loaded = read_output(site.analysis.store.get(site.first).step_outputs, LoadVolumesOutput)
    assert loaded is not None
    assert loaded.followup_annotations == []
    series_uid = str(pydicom.dcmread(gsps, stop_before_pixels=True).SeriesInstanceUID)
    complete_series(site.sf, site.settings.routing, series_uid, None, forced=True)
    [again] = take_in_series(site.sf, site.settings.verification, series_uid)
    assert site.analysis.store.get(site.first).state is JobState.SUPERSEDED
    assert _annotation(site).job_pk == again
    assert site.analysis.run(again) is JobState.DONE, site.analysis.store.get(again).error
    _refound_by(site, again, str(pydicom.dcmread(gsps, stop_before_pixels=True).SOPInstanceUID))


def test_an_arrow_arriving_while_the_running_job_finds_its_priors_is_read_by_that_job(tmp_path: Path) -> None:
    taken: list[int] = []
    gsps = tmp_path / "pr" / "arrow.dcm"

    def deliver_before_loading(job: int, step: str) -> None:  # the job has not begun to read its prompts
        if step == "retrieve_priors" and not gsps.exists():
            _arrow_on_the_lost_lesion(site, gsps)
            taken.extend(_received(site, gsps))

    site = _moved_followup(tmp_path, progress=deliver_before_loading)
    assert site.analysis.run(site.first) is JobState.DONE, site.analysis.store.get(site.first).error
    assert gsps.exists()
    assert taken == [], "no second job: the running one reads it"
    _refound_by(site, site.first, str(pydicom.dcmread(gsps, stop_before_pixels=True).SOPInstanceUID))
    with session_scope(site.sf) as s:
        assert s.scalar(select(TimepointVerification)) is None
        arrived = s.scalars(select(AuditEvent).where(AuditEvent.action == "job.annotation_arrived")).one()
    assert arrived.object_id == str(site.first)
    assert arrived.details is not None
    assert "while this job was running: it reads it" in arrived.details["reason"]
