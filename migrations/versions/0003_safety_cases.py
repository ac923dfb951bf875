"""Safety cases with their actions; break-reminder times on conversations.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite only auto-increments an INTEGER PRIMARY KEY.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("stretch_started_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("break_reminded_at", sa.DateTime(timezone=True), nullable=True))

    op.create_table(
        "safety_cases",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("user_id", BIG_ID, nullable=True),
        sa.Column("conversation_id", BIG_ID, nullable=True),
        sa.Column("platform", sa.String(length=16), nullable=False),
        sa.Column("user_pseudonym", sa.String(length=64), nullable=False),
        sa.Column("user_locale", sa.String(length=16), nullable=False),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "open",
                "acknowledged",
                "resolved",
                name="case_status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("handoff", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("opened_by", sa.String(length=80), nullable=False),
        sa.Column("excerpt", sa.Text(), nullable=True),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("notified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("notify_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_safety_cases_user_id_users"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_safety_cases_conversation_id_conversations"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_safety_cases")),
    )
    op.create_index("ix_safety_cases_user_status", "safety_cases", ["user_id", "status"])

    op.create_table(
        "safety_case_actions",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("case_id", BIG_ID, nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("actor", sa.String(length=80), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["case_id"],
            ["safety_cases.id"],
            name=op.f("fk_safety_case_actions_case_id_safety_cases"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_safety_case_actions")),
    )
    op.create_index(op.f("ix_safety_case_actions_case_id"), "safety_case_actions", ["case_id"])


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index(op.f("ix_safety_case_actions_case_id"), table_name="safety_case_actions")
    op.drop_table("safety_case_actions")
    op.drop_index("ix_safety_cases_user_status", table_name="safety_cases")
    op.drop_table("safety_cases")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("break_reminded_at")
        batch.drop_column("stretch_started_at")
