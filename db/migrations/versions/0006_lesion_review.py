"""per-lesion confidence and review flag on lesion observations (issue 15, item 3)

Revision ID: 0006_lesion_review
Revises: 0006 (verification; chained after it when main was merged in)
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_lesion_review"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("lesion_observation", schema=None) as batch_op:
        batch_op.add_column(sa.Column("confidence", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("review", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("review_reasons", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("lesion_observation", schema=None) as batch_op:
        batch_op.drop_column("review_reasons")
        batch_op.drop_column("review")
        batch_op.drop_column("confidence")
