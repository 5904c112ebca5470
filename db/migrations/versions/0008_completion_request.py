"""completion requests: a PACS's stable-series trigger kept until the series it names is indexed (issue 29)

Revision ID: 0008_completion_request
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_completion_request"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "completion_request",
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("expected_instances", sa.Integer(), nullable=True),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("series_uid", name=op.f("pk_completion_request")),
    )


def downgrade() -> None:
    op.drop_table("completion_request")
