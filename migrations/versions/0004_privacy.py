"""Consent times on users; tombstones, exports, retention runs and job locks.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite only auto-increments an INTEGER PRIMARY KEY.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("storage_consent_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("training_consent_at", sa.DateTime(timezone=True), nullable=True)
        )
    # Users who wrote before consent was asked are treated as having agreed to
    # storage when they first wrote; they are asked about training as before.
    op.execute("UPDATE users SET storage_consent_at = created_at")

    op.create_table(
        "tombstones",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("pseudonym", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tombstones")),
        sa.UniqueConstraint("pseudonym", name=op.f("uq_tombstones_pseudonym")),
    )
    op.create_table(
        "exports",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("dialogues", sa.Integer(), nullable=False),
        sa.Column("turns", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_exports")),
    )
    op.create_table(
        "retention_runs",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("ran_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cutoff", sa.DateTime(timezone=True), nullable=False),
        sa.Column("turns_deleted", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retention_runs")),
    )
    op.create_table(
        "job_locks",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_job_locks")),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("job_locks")
    op.drop_table("retention_runs")
    op.drop_table("exports")
    op.drop_table("tombstones")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("training_consent_at")
        batch.drop_column("storage_consent_at")
