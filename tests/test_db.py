"""Database: migrations from empty on SQLite and PostgreSQL, a CRUD round trip, append-only audit events."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from lesiontrack.cli import app
from lesiontrack.db.models import (
    AnalysisJob,
    AuditEvent,
    Instance,
    JobState,
    Lesion,
    LesionObservation,
    LesionOrigin,
)
from lesiontrack.db.repository import (
    AuditImmutableError,
    audit,
    audit_events,
    get_or_create_patient,
    get_or_create_series,
    get_or_create_study,
)
from lesiontrack.db.session import (
    current_revision,
    head_revision,
    make_engine,
    make_session_factory,
    session_scope,
    upgrade,
)
from lesiontrack.db.status import LesionStatus
from tests.support.tools import require_tool

TABLES = {
    "patient",
    "study",
    "series",
    "instance",
    "lesion",
    "lesion_observation",
    "analysis_job",
    "delivery",
    "audit_event",
}


def _crud_round_trip(url: str) -> None:
    engine = make_engine(url)
    factory = make_session_factory(engine)
    with session_scope(factory) as s:
        p = get_or_create_patient(s, "PAT-1", "HOSP")
        st = get_or_create_study(s, p, "1.2.3", study_date="20260101")
        se = get_or_create_series(s, st, "1.2.3.4", modality="CT")
        s.add(
            Instance(
                sop_instance_uid="1.2.3.4.5",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                series_pk=se.id,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                file_path="/x.dcm",
                size_bytes=10,
                sha256="0" * 64,
            )
        )
        les = Lesion(tracking_uid="2.25.1", tracking_id="L1 liver", patient_pk=p.id, origin=LesionOrigin.SEG)
        s.add(les)
        s.flush()
        s.add(
            LesionObservation(
                lesion_pk=les.id,
                series_instance_uid="1.2.3.4",
                status=LesionStatus.PRESENT,
                volume_mm3=1234.5,
                measurements={"long_axis_mm": 12.0},
            )
        )
        s.add(AnalysisJob(followup_series_uid="1.2.3.4", state=JobState.QUEUED, step_timings={"register": 1.5}))
        audit(s, "test", "job.created", "job", 1, reason="unit test")
    with session_scope(factory) as s:
        assert get_or_create_patient(s, "PAT-1", "HOSP").id == p.id  # found, not duplicated
        obs = s.scalars(select(LesionObservation)).one()
        assert obs.lesion.tracking_id == "L1 liver"
        assert obs.measurements == {"long_axis_mm": 12.0}
        job = s.scalars(select(AnalysisJob)).one()
        assert job.state is JobState.QUEUED
        assert job.step_timings == {"register": 1.5}
        job.state = JobState.DONE
    with session_scope(factory) as s:
        assert s.scalars(select(AnalysisJob)).one().state is JobState.DONE
        s.delete(s.scalars(select(Instance)).one())
    with session_scope(factory) as s:
        assert s.scalars(select(Instance)).all() == []
    engine.dispose()


def _rewrite_first_event(factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as s:
        ev = s.scalars(select(AuditEvent)).first()
        assert ev is not None
        ev.action = "rewritten"


def _audit_is_append_only(url: str) -> None:
    engine = make_engine(url)
    factory = make_session_factory(engine)
    with session_scope(factory) as s:
        audit(s, "tester", "thing.happened", "thing", "7", detail=1)
    with pytest.raises(AuditImmutableError):
        _rewrite_first_event(factory)
    with pytest.raises(AuditImmutableError), session_scope(factory) as s:
        s.delete(s.scalars(select(AuditEvent)).first())
    # Below the ORM, the database itself refuses.
    for stmt in ("UPDATE audit_event SET action='x'", "DELETE FROM audit_event"):
        with pytest.raises(DatabaseError, match="append-only"), engine.begin() as conn:
            conn.execute(text(stmt))
    with session_scope(factory) as s:
        events = audit_events(s)
        assert [e.action for e in events][-1] == "thing.happened"
        assert events[-1].details == {"detail": 1}
    engine.dispose()


def test_sqlite_upgrade_from_empty_and_crud(sqlite_url):
    assert current_revision(sqlite_url) is None
    upgrade(sqlite_url)
    assert current_revision(sqlite_url) == head_revision()
    assert set(inspect(make_engine(sqlite_url)).get_table_names()) >= TABLES
    _crud_round_trip(sqlite_url)
    _audit_is_append_only(sqlite_url)


def test_sqlite_downgrade_and_upgrade_again(sqlite_url):
    upgrade(sqlite_url)
    from alembic import command

    from lesiontrack.db.session import _alembic_config

    command.downgrade(_alembic_config(sqlite_url), "base")
    assert not TABLES & set(inspect(make_engine(sqlite_url)).get_table_names())
    upgrade(sqlite_url)
    assert current_revision(sqlite_url) == head_revision()


@pytest.mark.services
def test_postgresql_upgrade_from_empty_and_crud(postgres_url):
    require_tool("runuser")
    assert current_revision(postgres_url) is None
    upgrade(postgres_url)
    assert current_revision(postgres_url) == head_revision()
    assert set(inspect(make_engine(postgres_url)).get_table_names()) >= TABLES
    _crud_round_trip(postgres_url)
    _audit_is_append_only(postgres_url)


def test_cli_db_upgrade_and_current_sqlite_default(tmp_path, monkeypatch):
    monkeypatch.setenv("LESIONTRACK_DATA_DIR", str(tmp_path / "data"))
    runner = CliRunner()
    res = runner.invoke(app, ["db", "current"])
    assert res.exit_code == 1
    assert "(empty)" in res.output
    res = runner.invoke(app, ["db", "upgrade"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "data" / "lesiontrack.sqlite3").exists()
    res = runner.invoke(app, ["db", "current"])
    assert res.exit_code == 0
    assert "(head)" in res.output


@pytest.mark.services
def test_cli_db_upgrade_postgresql_url(postgres_url):
    res = CliRunner().invoke(app, ["db", "upgrade", "--url", postgres_url])
    assert res.exit_code == 0, res.output
    assert head_revision() in res.output
