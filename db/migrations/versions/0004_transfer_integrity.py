"""transfer integrity: how each series' last association ended, per-instance association marks, the expected
instance count, and the objects a destination already acknowledged per delivery (issue 19)

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_transfer", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("expected_instances", sa.Integer(), nullable=True))
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.add_column(sa.Column("association_uid", sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column("transfer_incomplete", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.create_index(batch_op.f("ix_instance_association_uid"), ["association_uid"], unique=False)
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.add_column(sa.Column("acknowledged", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.drop_column("acknowledged")
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instance_association_uid"))
        batch_op.drop_column("transfer_incomplete")
        batch_op.drop_column("association_uid")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_column("expected_instances")
        batch_op.drop_column("last_transfer")
