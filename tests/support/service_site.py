"""One follow-up analysed by the service in-process: the patient's baseline, its SEG and the first follow-up
ingested as the door ingests them, the job run by the service's own pipeline, the API over the same database."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.config.settings import Settings
from lesiontrack.db.models import JobState, Patient
from lesiontrack.db.session import make_engine, make_session_factory, session_scope, upgrade
from lesiontrack.demo_data import DemoPatient
from lesiontrack.dicom_node.inbound.ingest import Ingestor, ingest_file
from lesiontrack.dicom_node.inbound.scp import storage_root
from lesiontrack.dicom_node.inbound.storage import InstanceStore
from lesiontrack.pipeline.jobs.steps import build_pipeline
from lesiontrack.pipeline.jobs.store import JobStore, JobView
from lesiontrack.service import build_analysis_service, build_ports
from lesiontrack.web import JobStoreControl, create_app


@dataclass
class AnalysedFollowup:
    sf: sessionmaker[Session]
    service: Any  # lesiontrack.service.build_analysis_service's AnalysisService
    job: JobView
    client: TestClient
    patient_pk: int


def ingest(settings: Settings, sf: sessionmaker[Session], files: list[Path]) -> None:
    """Store and index ``files`` as the DICOM door does (every one must be taken)."""
    ingestor = Ingestor(InstanceStore(storage_root(settings), fsync=False), sf)
    for f in files:
        assert ingest_file(ingestor, f).ok
    ingestor.close()


def analyse_first_followup(settings: Settings, patient: DemoPatient) -> AnalysedFollowup:
    """A fresh database, the patient's baseline + SEG + first follow-up ingested, that follow-up's job run (it must
    end DONE), and an API client on the same database."""
    upgrade(settings.effective_database_url)
    sf = make_session_factory(make_engine(settings.effective_database_url))
    ingest(settings, sf, [*patient.baseline.files, patient.seg_file, *patient.followups[0].files])
    service = build_analysis_service(settings, sf, build_pipeline, ports=build_ports(settings, sf))
    job = service.store.create(patient.followups[0].series_uid)
    assert service.run(job) is JobState.DONE, service.store.get(job).error
    client = TestClient(create_app(settings, sf, job_control=JobStoreControl(JobStore(sf), actor="api")))
    with session_scope(sf) as s:
        patient_pk = s.scalar(select(Patient.id))
    assert patient_pk is not None
    return AnalysedFollowup(sf, service, service.store.get(job), client, patient_pk)
