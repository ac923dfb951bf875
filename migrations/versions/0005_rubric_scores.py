"""Rubric scores from an LLM judge.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite only auto-increments an INTEGER PRIMARY KEY.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "rubric_scores",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("dialogue_key", sa.String(length=64), nullable=False),
        sa.Column("judge_model", sa.String(length=128), nullable=False),
        sa.Column("prompt_version", sa.String(length=32), nullable=False),
        sa.Column("settings_key", sa.String(length=32), nullable=False),
        sa.Column("repeat_index", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=96), nullable=False),
        sa.Column("language", sa.String(length=8), nullable=False),
        sa.Column("dialogue", sa.JSON(), nullable=False),
        sa.Column("adapter_version", sa.String(length=128), nullable=True),
        sa.Column("scores", sa.JSON(), nullable=True),
        sa.Column("reasons", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("raw", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rubric_scores")),
        sa.UniqueConstraint(
            "dialogue_key",
            "judge_model",
            "prompt_version",
            "settings_key",
            "repeat_index",
            name="uq_rubric_scores_identity",
        ),
    )
    op.create_index(
        op.f("ix_rubric_scores_dialogue_key"), "rubric_scores", ["dialogue_key"], unique=False
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index(op.f("ix_rubric_scores_dialogue_key"), table_name="rubric_scores")
    op.drop_table("rubric_scores")
