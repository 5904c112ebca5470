"""New-lesion search runs and their candidates (awaiting an operator's confirm / reject).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

CANDIDATE_STATES = ("unconfirmed", "confirmed", "rejected")


def upgrade() -> None:
    op.create_table(
        "new_lesion_search",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("job_pk", sa.Integer(), sa.ForeignKey("analysis_job.id"), nullable=True),
        sa.Column("detector", sa.String(64), nullable=False),
        sa.Column("detector_version", sa.String(32), nullable=False),
        sa.Column("candidates_found", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_new_lesion_search_series_instance_uid", "new_lesion_search", ["series_instance_uid"])
    op.create_index("ix_new_lesion_search_job_pk", "new_lesion_search", ["job_pk"])
    op.create_table(
        "new_lesion_candidate",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("search_pk", sa.Integer(), sa.ForeignKey("new_lesion_search.id"), nullable=False),
        sa.Column("patient_pk", sa.Integer(), sa.ForeignKey("patient.id"), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("tracking_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("tracking_id", sa.String(64), nullable=False),
        sa.Column("tissue", sa.String(32), nullable=False),
        sa.Column("centre_x_mm", sa.Float(), nullable=False),
        sa.Column("centre_y_mm", sa.Float(), nullable=False),
        sa.Column("centre_z_mm", sa.Float(), nullable=False),
        sa.Column("volume_mm3", sa.Float(), nullable=False),
        sa.Column("diameter_mm", sa.Float(), nullable=False),
        sa.Column("mean_hu", sa.Float(), nullable=False),
        sa.Column("contrast_hu", sa.Float(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("mask_path", sa.Text(), nullable=False),
        sa.Column("seg_sop_instance_uid", sa.String(64), nullable=True),
        sa.Column("segment_number", sa.Integer(), nullable=True),
        sa.Column(
            "state",
            sa.Enum(*CANDIDATE_STATES, name="candidatestate", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("decided_by", sa.String(128), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    for col in ("search_pk", "patient_pk", "series_instance_uid"):
        op.create_index(f"ix_new_lesion_candidate_{col}", "new_lesion_candidate", [col])


def downgrade() -> None:
    op.drop_table("new_lesion_candidate")
    op.drop_table("new_lesion_search")
