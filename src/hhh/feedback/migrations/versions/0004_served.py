"""Served answers (`hhh serve`) and the feedback their users send.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "served",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("response_id", sa.String(80), nullable=False, index=True),
        sa.Column("choice", sa.Integer, nullable=False),
        sa.Column("prompt_id", sa.Integer, sa.ForeignKey("prompts.id"), nullable=False, index=True),
        sa.Column("completion_id", sa.Integer, sa.ForeignKey("completions.id"), nullable=False),
        sa.Column("served_as", sa.String(300), nullable=False),
        sa.Column("user", sa.String(200)),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("response_id", "choice"),
    )
    op.create_table(
        "served_feedback",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("feedback_id", sa.String(64), nullable=False, unique=True),
        sa.Column("served_id", sa.Integer, sa.ForeignKey("served.id"), nullable=False, index=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("value", sa.Float),
        sa.Column("edit_completion_id", sa.Integer, sa.ForeignKey("completions.id")),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("served_feedback")
    op.drop_table("served")
