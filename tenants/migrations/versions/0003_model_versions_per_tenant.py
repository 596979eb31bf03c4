"""model versions per tenant: pins, version choice, staged rollouts

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(
            sa.Column("model_version", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )
        batch.add_column(
            sa.Column(
                "allow_version_choice", sa.Boolean(), nullable=False, server_default=sa.false()
            )
        )
    with op.batch_alter_table("control_state") as batch:
        batch.add_column(
            sa.Column("rollout_version", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )
        batch.add_column(
            sa.Column("rollout_percent", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("control_state") as batch:
        batch.drop_column("rollout_percent")
        batch.drop_column("rollout_version")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("allow_version_choice")
        batch.drop_column("model_version")
