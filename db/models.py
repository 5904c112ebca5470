"""SQLAlchemy 2.x typed ORM: what LesionTrack knows about patients, images, lesions, jobs and the audit trail.

The schema is created and changed only by the Alembic migrations in ``db/migrations``.
Identifiers stored here are DICOM UIDs and internal keys; names are never logged.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from lesiontrack.db.status import LesionStatus


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class SeriesState(enum.StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"


class TransferOutcome(enum.StrEnum):
    """How the last association that delivered instances of a series ended."""

    OPEN = "open"  # still sending (or the node stopped while it was)
    RELEASED = "released"  # A-RELEASE: the sender said it was done
    ABORTED = "aborted"  # A-ABORT or a dropped connection: the transfer may be incomplete


class RoutingDecision(enum.StrEnum):
    PENDING = "pending"
    ANALYSE = "analyse"
    SKIP = "skip"


class LesionOrigin(enum.StrEnum):
    SEG = "seg"
    SR = "sr"
    PROMPT = "prompt"
    GSPS = "gsps"  # first marked in a presentation state (lines, arrows, ellipses a PACS workstation saved)
    RTSTRUCT = "rtstruct"  # first marked in an RT structure set (contours, points)
    NEW = "new"
    ADDED = "added"  # added by a reader at a follow-up, and already visible before it (not a RECIST new lesion)


class CandidateState(enum.StrEnum):
    """An operator's decision on a new-lesion candidate."""

    UNCONFIRMED = "unconfirmed"
    CONFIRMED = "confirmed"
    REJECTED = "rejected"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRY_WAIT = "retry_wait"
    DONE = "done"
    NOTHING_TO_TRACK = "nothing_to_track"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"  # claimed by one sender until ``next_attempt_at`` (the claim's lease)
    RETRY_WAIT = "retry_wait"
    DELIVERED = "delivered"
    DEAD_LETTER = "dead_letter"
    SUPERSEDED = "superseded"  # its job was superseded before it was sent: never sent


def _enum(e: type[enum.Enum], name: str | None = None) -> Enum:
    return Enum(
        e,
        name=name or e.__name__.lower(),
        values_callable=lambda x: [m.value for m in x],
        native_enum=False,
        length=32,
        validate_strings=True,
    )


def _enum16(e: type[enum.Enum]) -> Enum:
    return Enum(e, values_callable=lambda x: [m.value for m in x], native_enum=False, length=16, validate_strings=True)


class Patient(Base):
    __tablename__ = "patient"
    __table_args__ = (UniqueConstraint("patient_id", "issuer", name="uq_patient_id_issuer"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    issuer: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    studies: Mapped[list[Study]] = relationship(back_populates="patient")
    lesions: Mapped[list[Lesion]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part: Mapped[str | None] = mapped_column(String(16))
    frame_of_reference_uid: Mapped[str | None] = mapped_column(String(64))
    slice_thickness_mm: Mapped[float | None] = mapped_column(Float)  # slice spacing of the analysed volume (RECIST)
    state: Mapped[SeriesState] = mapped_column(_enum(SeriesState), default=SeriesState.RECEIVING)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_received_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    routing_decision: Mapped[RoutingDecision] = mapped_column(_enum(RoutingDecision), default=RoutingDecision.PENDING)
    routing_reason: Mapped[str | None] = mapped_column(Text)
    created_by_us: Mapped[bool] = mapped_column(default=False)
    last_transfer: Mapped[TransferOutcome | None] = mapped_column(_enum16(TransferOutcome))
    expected_instances: Mapped[int | None] = mapped_column(Integer)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "sha256", name="uq_instance_uid_bytes"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    file_path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    sender_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    association_uid: Mapped[str | None] = mapped_column(String(36), index=True)
    transfer_incomplete: Mapped[bool] = mapped_column(default=False, server_default="0")

    series: Mapped[Series] = relationship(back_populates="instances")


class OpenTransfer(Base):
    """One row per (open association, series it delivered instances of), written by the receiving process's
    indexer and removed when the association ends: the series-completion state every receiver process shares
    (issue 18). ``pid`` names the receiver process, so rows of a process that died are reaped."""

    __tablename__ = "open_transfer"

    association_uid: Mapped[str] = mapped_column(String(36), primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    pid: Mapped[int] = mapped_column(Integer, index=True)
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CompletionRequest(Base):
    """A PACS's "this series is stable" signal (``POST /api/series/{uid}/complete``), kept until it is answered:
    the series completes once ``expected_instances`` (what the PACS says it sent) are indexed, or — without a
    count — once no association is still delivering it; at ``deadline_at`` at the latest. A series not known yet
    when the signal arrives (the receivers have not indexed it) is remembered here, not refused (issue 29)."""

    __tablename__ = "completion_request"

    series_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    expected_instances: Mapped[int | None] = mapped_column(Integer)
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deadline_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(64))


class Lesion(Base):
    """A lesion with a persistent identity across timepoints (DICOM Tracking UID / Tracking ID)."""

    __tablename__ = "lesion"

    id: Mapped[int] = mapped_column(primary_key=True)
    tracking_uid: Mapped[str] = mapped_column(String(64), unique=True)
    tracking_id: Mapped[str] = mapped_column(String(64))
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    anatomic_site: Mapped[str | None] = mapped_column(String(64))
    origin: Mapped[LesionOrigin] = mapped_column(_enum(LesionOrigin))
    origin_series_uid: Mapped[str | None] = mapped_column(String(64))
    is_target: Mapped[bool | None] = mapped_column()
    retired_at_series_uid: Mapped[str | None] = mapped_column(String(64))
    """A reader deleted the lesion in a correction of this series: not tracked there or later, not in RECIST."""
    retired_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    patient: Mapped[Patient] = relationship(back_populates="lesions")
    observations: Mapped[list[LesionObservation]] = relationship(back_populates="lesion")


class LesionObservation(Base):
    """One lesion seen (or found vanished) on one series."""

    __tablename__ = "lesion_observation"

    id: Mapped[int] = mapped_column(primary_key=True)
    lesion_pk: Mapped[int] = mapped_column(ForeignKey("lesion.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    job_pk: Mapped[int | None] = mapped_column(ForeignKey("analysis_job.id"), index=True)
    seg_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    segment_number: Mapped[int | None] = mapped_column(Integer)
    volume_mm3: Mapped[float | None] = mapped_column(Float)
    long_axis_mm: Mapped[float | None] = mapped_column(Float)
    short_axis_mm: Mapped[float | None] = mapped_column(Float)
    centre_x_mm: Mapped[float | None] = mapped_column(Float)
    centre_y_mm: Mapped[float | None] = mapped_column(Float)
    centre_z_mm: Mapped[float | None] = mapped_column(Float)
    # db/status.py's LesionStatus, one enum for every layer; the type keeps the schema's name (migration 0001)
    status: Mapped[LesionStatus] = mapped_column(_enum(LesionStatus, name="observationstatus"))
    engine: Mapped[str | None] = mapped_column(String(64))
    engine_version: Mapped[str | None] = mapped_column(String(32))
    measurements: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    propagated_from_series_uid: Mapped[str | None] = mapped_column(String(64))
    """Provenance: the annotated CT series this result was propagated from (None for the annotation itself)."""
    propagated_from_sop_uid: Mapped[str | None] = mapped_column(String(64))
    """Provenance: the SEG/SR (a person's, or one a person confirmed) whose lesions were the prompt."""
    superseded_by_job: Mapped[int | None] = mapped_column(Integer)
    """A later job of the same series replaced this observation (kept for the audit trail, not reported)."""
    verification_pk: Mapped[int | None] = mapped_column(Integer)
    """The reader's verification this observation was adopted from (None: a machine result)."""
    confidence: Mapped[float | None] = mapped_column(Float)
    """Confidence of this result in [0, 1] (pipeline.science.confidence); None: an annotation, or not re-segmented."""
    review: Mapped[bool] = mapped_column(default=False, server_default="0")
    """Flagged for review: confidence below ``tracking.review_threshold`` or inconsistent with its neighbour."""
    review_reasons: Mapped[list[str] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    lesion: Mapped[Lesion] = relationship(back_populates="observations")


class AnalysisJob(Base):
    """A persisted analysis of one follow-up series (a state machine, see pipeline.jobs.store)."""

    __tablename__ = "analysis_job"

    id: Mapped[int] = mapped_column(primary_key=True)
    followup_series_uid: Mapped[str] = mapped_column(String(64), index=True)
    patient_pk: Mapped[int | None] = mapped_column(ForeignKey("patient.id"), index=True)
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.QUEUED, index=True)
    step: Mapped[str | None] = mapped_column(String(32))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    step_timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    step_outputs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    worker: Mapped[str | None] = mapped_column(String(128))
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("analysis_job.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Delivery(Base):
    """One object (or a set of files) to be sent to one destination, with retries and a dead-letter state."""

    __tablename__ = "delivery"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_pk: Mapped[int | None] = mapped_column(ForeignKey("analysis_job.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    file_paths: Mapped[list[str]] = mapped_column(JSON)
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState), default=DeliveryState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    acknowledged: Mapped[list[str] | None] = mapped_column(JSON)  # files the destination already stored
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class NewLesionSearchRun(Base):
    """One run of the new-lesion search on a follow-up series (by one job): that new lesions were looked for."""

    __tablename__ = "new_lesion_search"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    job_pk: Mapped[int | None] = mapped_column(ForeignKey("analysis_job.id"), index=True)
    detector: Mapped[str] = mapped_column(String(64))
    detector_version: Mapped[str] = mapped_column(String(32))
    candidates_found: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class NewLesionCandidate(Base):
    """A focal finding in a follow-up that was not in the prior; unconfirmed until an operator decides."""

    __tablename__ = "new_lesion_candidate"

    id: Mapped[int] = mapped_column(primary_key=True)
    search_pk: Mapped[int] = mapped_column(ForeignKey("new_lesion_search.id"), index=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    tracking_uid: Mapped[str] = mapped_column(String(64), unique=True)
    tracking_id: Mapped[str] = mapped_column(String(64))
    tissue: Mapped[str] = mapped_column(String(32))
    centre_x_mm: Mapped[float] = mapped_column(Float)
    centre_y_mm: Mapped[float] = mapped_column(Float)
    centre_z_mm: Mapped[float] = mapped_column(Float)
    volume_mm3: Mapped[float] = mapped_column(Float)
    diameter_mm: Mapped[float] = mapped_column(Float)
    mean_hu: Mapped[float] = mapped_column(Float)
    contrast_hu: Mapped[float] = mapped_column(Float)
    confidence: Mapped[float] = mapped_column(Float)
    reasons: Mapped[list[str]] = mapped_column(JSON)
    mask_path: Mapped[str] = mapped_column(Text)  # .npz: the mask's bounding-box crop on the follow-up CT grid
    seg_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    segment_number: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[CandidateState] = mapped_column(_enum(CandidateState), default=CandidateState.UNCONFIRMED)
    decided_by: Mapped[str | None] = mapped_column(String(128))
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class VerificationMethod(enum.StrEnum):
    CORRECTION = "correction"  # a person's SEG/SR of the timepoint (from the PACS or uploaded)
    AS_IS = "as-is"  # an operator accepted our result unchanged
    #: a person's annotation (GSPS, RTSTRUCT; or a SEG/SR on a prior) that arrived after results it changes: a prompt
    #: at its timepoint, not a verification of it; that timepoint (when analysed) and the later ones are re-analysed
    ANNOTATION = "annotation"


class VerificationState(enum.StrEnum):
    ACCEPTED = "accepted"  # recorded; the adoption job is queued or running
    APPLIED = "applied"  # the timepoint's result now is the verified one
    FAILED = "failed"  # the adoption job failed (its error says why; retry the job)


class TimepointVerification(Base):
    """A person verified the result of one analysed follow-up: by correcting it (a SEG/SR that is not ours and
    references the CT series) or by accepting it as is. The verified timepoint is then a propagation source."""

    __tablename__ = "timepoint_verification"

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)  # the verified CT series
    method: Mapped[VerificationMethod] = mapped_column(_enum16(VerificationMethod))
    source_sop_instance_uid: Mapped[str | None] = mapped_column(String(64), unique=True)
    source_series_uid: Mapped[str | None] = mapped_column(String(64))
    source_file: Mapped[str | None] = mapped_column(Text)
    source_manufacturer: Mapped[str | None] = mapped_column(String(64))
    sender_ae: Mapped[str | None] = mapped_column(String(16))
    verified_by: Mapped[str] = mapped_column(String(128))  # ContentCreatorName, or the operator
    verified_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    state: Mapped[VerificationState] = mapped_column(_enum16(VerificationState), default=VerificationState.ACCEPTED)
    reason: Mapped[str | None] = mapped_column(Text)
    job_pk: Mapped[int | None] = mapped_column(ForeignKey("analysis_job.id"), index=True)
    matches: Mapped[list[Any] | None] = mapped_column(JSON)  # per corrected segment: lesion and how it was matched
    reanalysis_jobs: Mapped[list[Any] | None] = mapped_column(JSON)  # later follow-ups re-analysed from it
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditEvent(Base):
    """Append-only audit trail. Updates and deletes are refused by the ORM and by database triggers."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64), index=True)
    object_type: Mapped[str | None] = mapped_column(String(32))
    object_id: Mapped[str | None] = mapped_column(String(128))
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
