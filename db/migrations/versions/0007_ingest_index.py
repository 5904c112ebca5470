"""ingest that scales: open associations per series in the database, shared by every receiver process (issue 18)

Revision ID: 0007
Revises: 0006_lesion_review
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006_lesion_review"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "open_transfer",
        sa.Column("association_uid", sa.String(length=36), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("association_uid", "series_uid", name=op.f("pk_open_transfer")),
    )
    with op.batch_alter_table("open_transfer", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_open_transfer_series_uid"), ["series_uid"], unique=False)
        batch_op.create_index(batch_op.f("ix_open_transfer_pid"), ["pid"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("open_transfer", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_open_transfer_pid"))
        batch_op.drop_index(batch_op.f("ix_open_transfer_series_uid"))
    op.drop_table("open_transfer")
