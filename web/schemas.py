"""Response models of the HTTP API (they document it in OpenAPI) and their construction from ORM rows."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from enum import StrEnum
from typing import overload

from pydantic import BaseModel, Field, JsonValue

from lesiontrack.db import models as m
from lesiontrack.pipeline.jobs.candidates import CandidateView
from lesiontrack.pipeline.jobs.verification import VerificationView


@overload
def _v(x: StrEnum | str) -> str: ...
@overload
def _v(x: None) -> None: ...
def _v(x: StrEnum | str | None) -> str | None:
    """An enum member as its value (what the API shows); a plain string or None as it is."""
    return x.value if isinstance(x, StrEnum) else x


class Health(BaseModel):
    status: str
    version: str | None = None
    database: str | None = None
    schema_revision: str | None = None
    detail: str | None = None


class Step(BaseModel):
    name: str
    seconds: float | None


class JobSummary(BaseModel):
    id: int
    followup_series_uid: str
    patient_pk: int | None
    state: str
    step: str | None
    attempts: int
    error: str | None
    superseded_by: int | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    next_retry_at: datetime | None

    @classmethod
    def of(cls, j: m.AnalysisJob) -> JobSummary:
        return cls(
            id=j.id,
            followup_series_uid=j.followup_series_uid,
            patient_pk=j.patient_pk,
            state=_v(j.state),
            step=j.step,
            attempts=j.attempts,
            error=j.error,
            superseded_by=j.superseded_by,
            created_at=j.created_at,
            started_at=j.started_at,
            finished_at=j.finished_at,
            next_retry_at=j.next_retry_at,
        )


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    object_type: str | None
    object_id: str | None
    details: dict[str, JsonValue] | None

    @classmethod
    def of(cls, e: m.AuditEvent) -> AuditOut:
        return cls(
            id=e.id,
            at=e.at,
            actor=e.actor,
            action=e.action,
            object_type=e.object_type,
            object_id=e.object_id,
            details=e.details,
        )


class JobDetail(JobSummary):
    worker: str | None
    steps: list[Step]
    step_timings: dict[str, JsonValue]
    step_outputs: dict[str, JsonValue]
    total_seconds: float
    events: list[AuditOut]

    @classmethod
    def detail(cls, j: m.AnalysisJob, events: list[m.AuditEvent]) -> JobDetail:
        timings = dict(j.step_timings or {})
        steps = [Step(name=k, seconds=float(v) if isinstance(v, (int, float)) else None) for k, v in timings.items()]
        return cls(
            **JobSummary.of(j).model_dump(),
            worker=j.worker,
            steps=steps,
            step_timings=timings,
            step_outputs=dict(j.step_outputs or {}),
            total_seconds=sum(s.seconds or 0.0 for s in steps),
            events=[AuditOut.of(e) for e in events],
        )


class JobList(BaseModel):
    total: int
    items: list[JobSummary]
    counts: dict[str, int] = {}  # all jobs by state (ignores the filters)


class JobQueued(BaseModel):
    job_id: int
    detail: str


class PatientOut(BaseModel):
    id: int
    patient_id: str
    issuer: str
    study_count: int
    lesion_count: int
    latest_study_date: str | None


class SeriesOut(BaseModel):
    series_instance_uid: str
    study_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    body_part: str | None
    state: str
    instance_count: int
    routing_decision: str
    routing_reason: str | None
    created_by_us: bool
    completed_at: datetime | None

    @classmethod
    def of(cls, s: m.Series) -> SeriesOut:
        return cls(
            series_instance_uid=s.series_instance_uid,
            study_instance_uid=s.study.study_instance_uid,
            modality=s.modality,
            series_number=s.series_number,
            series_description=s.series_description,
            body_part=s.body_part,
            state=_v(s.state),
            instance_count=s.instance_count,
            routing_decision=_v(s.routing_decision),
            routing_reason=s.routing_reason,
            created_by_us=bool(s.created_by_us),
            completed_at=s.completed_at,
        )


class SeriesList(BaseModel):
    total: int
    items: list[SeriesOut]


class SeriesCompleted(BaseModel):
    """Answer to an explicit completion trigger."""

    series_instance_uid: str
    completed: bool = Field(
        description="false: not completed by this call — already complete with nothing received since, or pending"
    )
    pending: bool = Field(
        False,
        description="remembered: completes once the instances the PACS sent are indexed (within "
        "dicom.trigger_wait_seconds); also for a series none of whose instances is indexed yet",
    )
    indexed_instances: int | None = Field(None, description="distinct instances of the series indexed so far")
    expected_instances: int | None = Field(None, description="what the PACS said it sent (query or C-FIND)")
    routing_decision: str
    routing_reason: str | None
    job_id: int | None = None
    detail: str


class StudyOut(BaseModel):
    study_instance_uid: str
    patient_pk: int
    study_date: str | None
    study_time: str | None
    accession_number: str | None
    series: list[SeriesOut]

    @classmethod
    def of(cls, st: m.Study) -> StudyOut:
        return cls(
            study_instance_uid=st.study_instance_uid,
            patient_pk=st.patient_pk,
            study_date=st.study_date,
            study_time=st.study_time,
            accession_number=st.accession_number,
            series=[SeriesOut.of(s) for s in sorted(st.series, key=lambda x: (x.series_number or 0, x.id))],
        )


class SeriesDetail(SeriesOut):
    jobs: list[JobSummary]


class ObservationOut(BaseModel):
    id: int
    series_instance_uid: str
    job_id: int | None
    status: str
    volume_mm3: float | None
    long_axis_mm: float | None
    short_axis_mm: float | None
    centre_mm: list[float | None]
    seg_sop_instance_uid: str | None
    segment_number: int | None
    engine: str | None
    engine_version: str | None
    measurements: dict[str, JsonValue] | None
    propagated_from_series_uid: str | None = None
    propagated_from_sop_uid: str | None = None
    confidence: float | None = None
    review: bool = False
    review_reasons: list[str] = []
    created_at: datetime | None

    @classmethod
    def of(cls, o: m.LesionObservation) -> ObservationOut:
        return cls(
            id=o.id,
            series_instance_uid=o.series_instance_uid,
            job_id=o.job_pk,
            status=_v(o.status),
            volume_mm3=o.volume_mm3,
            long_axis_mm=o.long_axis_mm,
            short_axis_mm=o.short_axis_mm,
            centre_mm=[o.centre_x_mm, o.centre_y_mm, o.centre_z_mm],
            seg_sop_instance_uid=o.seg_sop_instance_uid,
            segment_number=o.segment_number,
            engine=o.engine,
            engine_version=o.engine_version,
            measurements=o.measurements,
            propagated_from_series_uid=o.propagated_from_series_uid,
            propagated_from_sop_uid=o.propagated_from_sop_uid,
            confidence=o.confidence,
            review=bool(o.review),
            review_reasons=[str(r) for r in o.review_reasons or []],
            created_at=o.created_at,
        )


class LesionOut(BaseModel):
    id: int
    patient_pk: int
    tracking_id: str
    tracking_uid: str
    anatomic_site: str | None
    origin: str
    origin_series_uid: str | None
    is_target: bool | None
    observations: list[ObservationOut]

    @classmethod
    def of(cls, l: m.Lesion) -> LesionOut:
        return cls(
            id=l.id,
            patient_pk=l.patient_pk,
            tracking_id=l.tracking_id,
            tracking_uid=l.tracking_uid,
            anatomic_site=l.anatomic_site,
            origin=_v(l.origin),
            origin_series_uid=l.origin_series_uid,
            is_target=l.is_target,
            observations=[ObservationOut.of(o) for o in sorted(l.observations, key=lambda o: o.id)],
        )


class AuditList(BaseModel):
    items: list[AuditOut]
    next_after_id: int | None


class CandidateOut(CandidateView):
    """A new-lesion candidate: an unconfirmed finding until an operator confirms or rejects it (the pipeline's
    :class:`pipeline.jobs.candidates.CandidateView`, as the API shows it)."""

    @classmethod
    def of(cls, c: CandidateView) -> CandidateOut:
        return cls.model_validate(c.model_dump())


class CandidateDecision(BaseModel):
    candidate: CandidateOut
    job_id: int | None = Field(None, description="the re-analysis queued after a confirmation")
    detail: str


class VerificationOut(BaseModel):
    """A person verified one analysed follow-up: by a correction (a SEG/SR that is not ours) or as is."""

    id: int
    patient_pk: int
    series_uid: str
    method: str
    source_sop_instance_uid: str | None
    verified_by: str
    verified_at: datetime
    state: str
    job_id: int | None = Field(None, description="the job that adopted the correction")
    reason: str | None
    matches: list[dict[str, JsonValue]] = Field(
        default_factory=list, description="per corrected segment: the lesion it is and how it was matched"
    )
    reanalysis_jobs: list[int] = Field(default_factory=list, description="later follow-ups re-analysed from it")

    @classmethod
    def of(cls, v: VerificationView) -> VerificationOut:
        d = asdict(v)
        d.pop("source_file", None)
        return cls(**{**d, "method": v.method.value, "state": v.state.value})


class VerificationQueued(BaseModel):
    verification_id: int | None = None
    jobs: list[int]
    detail: str
