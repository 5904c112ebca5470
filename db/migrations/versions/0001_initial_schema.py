"""initial schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-23 10:50:33.558385
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _create_audit_event() -> None:
    op.create_table(
        "audit_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("object_type", sa.String(length=32), nullable=True),
        sa.Column("object_id", sa.String(length=128), nullable=True),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_event", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_event_action"), ["action"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_event_at"), ["at"], unique=False)


def _create_patient() -> None:
    op.create_table(
        "patient",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("issuer", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("patient_id", "issuer", name="uq_patient_id_issuer"),
    )
    with op.batch_alter_table("patient", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_patient_patient_id"), ["patient_id"], unique=False)


def _create_analysis_job() -> None:
    op.create_table(
        "analysis_job",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("followup_series_uid", sa.String(length=64), nullable=False),
        sa.Column("patient_pk", sa.Integer(), nullable=True),
        sa.Column(
            "state",
            sa.Enum(
                "queued",
                "running",
                "retry_wait",
                "done",
                "nothing_to_track",
                "failed",
                "superseded",
                name="jobstate",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("step", sa.String(length=32), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_retry_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("step_timings", sa.JSON(), nullable=False),
        sa.Column("step_outputs", sa.JSON(), nullable=False),
        sa.Column("worker", sa.String(length=128), nullable=True),
        sa.Column("superseded_by", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["patient_pk"],
            ["patient.id"],
        ),
        sa.ForeignKeyConstraint(
            ["superseded_by"],
            ["analysis_job.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("analysis_job", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_analysis_job_followup_series_uid"), ["followup_series_uid"], unique=False)
        batch_op.create_index(batch_op.f("ix_analysis_job_patient_pk"), ["patient_pk"], unique=False)
        batch_op.create_index(batch_op.f("ix_analysis_job_state"), ["state"], unique=False)


def _create_lesion() -> None:
    op.create_table(
        "lesion",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tracking_uid", sa.String(length=64), nullable=False),
        sa.Column("tracking_id", sa.String(length=64), nullable=False),
        sa.Column("patient_pk", sa.Integer(), nullable=False),
        sa.Column("anatomic_site", sa.String(length=64), nullable=True),
        sa.Column(
            "origin",
            sa.Enum("seg", "sr", "prompt", "new", name="lesionorigin", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("origin_series_uid", sa.String(length=64), nullable=True),
        sa.Column("is_target", sa.Boolean(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["patient_pk"],
            ["patient.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tracking_uid"),
    )
    with op.batch_alter_table("lesion", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_lesion_patient_pk"), ["patient_pk"], unique=False)


def _create_study() -> None:
    op.create_table(
        "study",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("patient_pk", sa.Integer(), nullable=False),
        sa.Column("study_date", sa.String(length=8), nullable=True),
        sa.Column("study_time", sa.String(length=16), nullable=True),
        sa.Column("accession_number", sa.String(length=16), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["patient_pk"],
            ["patient.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_instance_uid"),
    )
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_study_patient_pk"), ["patient_pk"], unique=False)


def _create_delivery() -> None:
    op.create_table(
        "delivery",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_pk", sa.Integer(), nullable=True),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("file_paths", sa.JSON(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "pending", "retry_wait", "delivered", "dead_letter", name="deliverystate", native_enum=False, length=32
            ),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_pk"],
            ["analysis_job.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_delivery_job_pk"), ["job_pk"], unique=False)
        batch_op.create_index(batch_op.f("ix_delivery_state"), ["state"], unique=False)


def _create_lesion_observation() -> None:
    op.create_table(
        "lesion_observation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("lesion_pk", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("job_pk", sa.Integer(), nullable=True),
        sa.Column("seg_sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("segment_number", sa.Integer(), nullable=True),
        sa.Column("volume_mm3", sa.Float(), nullable=True),
        sa.Column("long_axis_mm", sa.Float(), nullable=True),
        sa.Column("short_axis_mm", sa.Float(), nullable=True),
        sa.Column("centre_x_mm", sa.Float(), nullable=True),
        sa.Column("centre_y_mm", sa.Float(), nullable=True),
        sa.Column("centre_z_mm", sa.Float(), nullable=True),
        sa.Column(
            "status",
            sa.Enum("present", "vanished", "new", name="observationstatus", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("engine", sa.String(length=64), nullable=True),
        sa.Column("engine_version", sa.String(length=32), nullable=True),
        sa.Column("measurements", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_pk"],
            ["analysis_job.id"],
        ),
        sa.ForeignKeyConstraint(
            ["lesion_pk"],
            ["lesion.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("lesion_observation", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_lesion_observation_job_pk"), ["job_pk"], unique=False)
        batch_op.create_index(batch_op.f("ix_lesion_observation_lesion_pk"), ["lesion_pk"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_lesion_observation_series_instance_uid"), ["series_instance_uid"], unique=False
        )


def _create_series() -> None:
    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("series_description", sa.String(length=64), nullable=True),
        sa.Column("body_part", sa.String(length=16), nullable=True),
        sa.Column("frame_of_reference_uid", sa.String(length=64), nullable=True),
        sa.Column(
            "state", sa.Enum("receiving", "complete", name="seriesstate", native_enum=False, length=32), nullable=False
        ),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("first_received_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "routing_decision",
            sa.Enum("pending", "analyse", "skip", name="routingdecision", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("routing_reason", sa.Text(), nullable=True),
        sa.Column("created_by_us", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_pk"],
            ["study.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("series_instance_uid"),
    )
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_series_study_pk"), ["study_pk"], unique=False)


def _create_instance() -> None:
    op.create_table(
        "instance",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("series_pk", sa.Integer(), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("file_path", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("sender_ae", sa.String(length=16), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["series_pk"],
            ["series.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_instance_uid", "sha256", name="uq_instance_uid_bytes"),
    )
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_instance_series_pk"), ["series_pk"], unique=False)
        batch_op.create_index(batch_op.f("ix_instance_sop_instance_uid"), ["sop_instance_uid"], unique=False)


def upgrade() -> None:
    _create_audit_event()
    _create_patient()
    _create_analysis_job()
    _create_lesion()
    _create_study()
    _create_delivery()
    _create_lesion_observation()
    _create_series()
    _create_instance()
    _audit_append_only()


_PG_FUNC = """
CREATE OR REPLACE FUNCTION audit_event_append_only() RETURNS trigger AS $$
BEGIN
  RAISE EXCEPTION 'audit_event is append-only';
END;
$$ LANGUAGE plpgsql;
"""


def _audit_append_only() -> None:
    """Database-level guard: audit events can be inserted, never updated or deleted."""
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_event_no_{verb.lower()} BEFORE {verb} ON audit_event "
                "BEGIN SELECT RAISE(ABORT, 'audit_event is append-only'); END;"
            )
    elif dialect == "postgresql":
        op.execute(_PG_FUNC)
        op.execute(
            "CREATE TRIGGER audit_event_append_only BEFORE UPDATE OR DELETE ON audit_event "
            "FOR EACH ROW EXECUTE FUNCTION audit_event_append_only()"
        )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_event_no_update")
        op.execute("DROP TRIGGER IF EXISTS audit_event_no_delete")
    elif dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_event_append_only ON audit_event")
        op.execute("DROP FUNCTION IF EXISTS audit_event_append_only()")
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instance_sop_instance_uid"))
        batch_op.drop_index(batch_op.f("ix_instance_series_pk"))

    op.drop_table("instance")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_series_study_pk"))

    op.drop_table("series")
    with op.batch_alter_table("lesion_observation", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_lesion_observation_series_instance_uid"))
        batch_op.drop_index(batch_op.f("ix_lesion_observation_lesion_pk"))
        batch_op.drop_index(batch_op.f("ix_lesion_observation_job_pk"))

    op.drop_table("lesion_observation")
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_delivery_state"))
        batch_op.drop_index(batch_op.f("ix_delivery_job_pk"))

    op.drop_table("delivery")
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_study_patient_pk"))

    op.drop_table("study")
    with op.batch_alter_table("lesion", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_lesion_patient_pk"))

    op.drop_table("lesion")
    with op.batch_alter_table("analysis_job", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_analysis_job_state"))
        batch_op.drop_index(batch_op.f("ix_analysis_job_patient_pk"))
        batch_op.drop_index(batch_op.f("ix_analysis_job_followup_series_uid"))

    op.drop_table("analysis_job")
    with op.batch_alter_table("patient", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_patient_patient_id"))

    op.drop_table("patient")
    with op.batch_alter_table("audit_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_event_at"))
        batch_op.drop_index(batch_op.f("ix_audit_event_action"))

    op.drop_table("audit_event")
