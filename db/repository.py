"""Repository helpers shared by every layer: find-or-create of the DICOM hierarchy and the append-only audit log."""

from __future__ import annotations

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from lesiontrack.db.models import AuditEvent, Patient, Series, Study


class AuditImmutableError(RuntimeError):
    """Raised when code tries to change or delete an audit event."""


@event.listens_for(Session, "before_flush")
def _refuse_audit_changes(session: Session, _ctx: object, _instances: object) -> None:
    for obj in list(session.dirty) + list(session.deleted):
        if isinstance(obj, AuditEvent):
            verb = "delete" if obj in session.deleted else "update"
            raise AuditImmutableError(f"audit events are append-only: refused {verb} of event {obj.id}")


def audit(
    session: Session,
    actor: str,
    action: str,
    object_type: str | None = None,
    object_id: str | int | None = None,
    **details: object,
) -> AuditEvent:
    """Append one audit event (flushed with the caller's transaction)."""
    ev = AuditEvent(
        actor=actor,
        action=action,
        object_type=object_type,
        object_id=None if object_id is None else str(object_id),
        details=details or None,
    )
    session.add(ev)
    return ev


def audit_events(
    session: Session, object_type: str | None = None, object_id: str | None = None, limit: int = 1000
) -> list[AuditEvent]:
    q = select(AuditEvent).order_by(AuditEvent.id)
    if object_type:
        q = q.where(AuditEvent.object_type == object_type)
    if object_id:
        q = q.where(AuditEvent.object_id == str(object_id))
    return list(session.scalars(q.limit(limit)))


def get_or_create_patient(session: Session, patient_id: str, issuer: str | None) -> Patient:
    issuer = issuer or ""
    p = session.scalar(select(Patient).where(Patient.patient_id == patient_id, Patient.issuer == issuer))
    if p is None:
        p = Patient(patient_id=patient_id, issuer=issuer)
        session.add(p)
        session.flush()
    return p


def get_or_create_study(session: Session, patient: Patient, study_uid: str, **attrs: object) -> Study:
    s = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if s is None:
        s = Study(study_instance_uid=study_uid, patient_pk=patient.id, **attrs)
        session.add(s)
        session.flush()
    return s


def get_or_create_series(session: Session, study: Study, series_uid: str, **attrs: object) -> Series:
    s = session.scalar(select(Series).where(Series.series_instance_uid == series_uid))
    if s is None:
        s = Series(series_instance_uid=series_uid, study_pk=study.id, **attrs)
        session.add(s)
        session.flush()
    return s
