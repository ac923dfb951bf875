"""Mark unreachable users; remember processed platform updates.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite only auto-increments an INTEGER PRIMARY KEY.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("unreachable_at", sa.DateTime(timezone=True), nullable=True))

    op.create_table(
        "processed_updates",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("platform", sa.String(length=16), nullable=False),
        sa.Column("update_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_processed_updates")),
        sa.UniqueConstraint(
            "platform", "update_id", name=op.f("uq_processed_updates_platform_update_id")
        ),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("processed_updates")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("unreachable_at")
