"""Browser sessions (logout and revocation end them) and an expiry on labelers' tokens.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("labelers") as batch:  # batch: SQLite cannot ALTER most things in place
        batch.add_column(sa.Column("token_expires_at", sa.DateTime))
    op.create_table(
        "sessions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("labeler_id", sa.Integer, sa.ForeignKey("labelers.id"), nullable=False, index=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("sessions")
    with op.batch_alter_table("labelers") as batch:
        batch.drop_column("token_expires_at")
