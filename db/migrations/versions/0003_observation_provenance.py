"""lesion observations record which annotation they were propagated from (issue 14)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 21:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("lesion_observation", schema=None) as batch_op:
        batch_op.add_column(sa.Column("propagated_from_series_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("propagated_from_sop_uid", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("lesion_observation", schema=None) as batch_op:
        batch_op.drop_column("propagated_from_sop_uid")
        batch_op.drop_column("propagated_from_series_uid")
