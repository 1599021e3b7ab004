"""Soft labels: a pair's probability that its better completion is the better one (AI feedback asked both ways).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("pairs") as batch:
        batch.add_column(sa.Column("probability", sa.Float))


def downgrade() -> None:
    with op.batch_alter_table("pairs") as batch:
        batch.drop_column("probability")
