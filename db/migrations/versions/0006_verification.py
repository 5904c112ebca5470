"""verified tracking: timepoint verifications, superseded observations, lesions retired by a reader (issue 16)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 01:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "timepoint_verification",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("patient_pk", sa.Integer(), sa.ForeignKey("patient.id"), nullable=False, index=True),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False, index=True),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("source_sop_instance_uid", sa.String(length=64), nullable=True, unique=True),
        sa.Column("source_series_uid", sa.String(length=64), nullable=True),
        sa.Column("source_file", sa.Text(), nullable=True),
        sa.Column("source_manufacturer", sa.String(length=64), nullable=True),
        sa.Column("sender_ae", sa.String(length=16), nullable=True),
        sa.Column("verified_by", sa.String(length=128), nullable=False),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("job_pk", sa.Integer(), sa.ForeignKey("analysis_job.id"), nullable=True, index=True),
        sa.Column("matches", sa.JSON(), nullable=True),
        sa.Column("reanalysis_jobs", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("lesion_observation", schema=None) as batch_op:
        batch_op.add_column(sa.Column("superseded_by_job", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("verification_pk", sa.Integer(), nullable=True))
    with op.batch_alter_table("lesion", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retired_at_series_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("retired_by", sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("lesion", schema=None) as batch_op:
        batch_op.drop_column("retired_by")
        batch_op.drop_column("retired_at_series_uid")
    with op.batch_alter_table("lesion_observation", schema=None) as batch_op:
        batch_op.drop_column("verification_pk")
        batch_op.drop_column("superseded_by_job")
    op.drop_table("timepoint_verification")
