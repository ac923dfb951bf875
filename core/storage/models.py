"""Database tables for users, conversations and turns (SQLAlchemy 2 declarative models)."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Named constraints so that migrations can drop and alter them by name on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_N_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments an INTEGER PRIMARY KEY, so BIGINT ids become INTEGER there.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime | None) -> datetime | None:
    """Return ``moment`` with UTC attached when the database returned it without a zone.

    SQLite stores these columns as text without the offset; PostgreSQL keeps it.
    """
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Role(enum.StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"
    MODERATOR = "moderator"


class User(Base):
    """One person on one platform."""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("platform", "platform_user_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    platform: Mapped[str] = mapped_column(String(16))
    platform_user_id: Mapped[str] = mapped_column(String(64))
    # None until the user chooses a language. Until then, replies follow the
    # platform's language hint or the default locale.
    locale: Mapped[str | None] = mapped_column(String(16))
    # Consent to use this user's conversations for training and quality scoring; off by default.
    training_consent: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=text("false")
    )
    # When the user agreed to have their conversation stored, and when they last
    # changed training consent; None means never.
    storage_consent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    training_consent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set when the platform reports that messages can no longer reach the user
    # (for example a Telegram user who blocked the bot); cleared when they write again.
    unreachable_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )

    conversations: Mapped[list[Conversation]] = relationship(back_populates="user")


class Conversation(Base):
    """The turns between one user and the bot in one chat; /reset closes it and opens a new one."""

    __tablename__ = "conversations"
    __table_args__ = (
        # At most one open conversation per user and chat.
        Index(
            "uq_conversations_open",
            "user_id",
            "platform_chat_id",
            unique=True,
            sqlite_where=text("closed_at IS NULL"),
            postgresql_where=text("closed_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    platform_chat_id: Mapped[str] = mapped_column(String(64))
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Start of the current stretch of talk without a break, and when the user
    # was last reminded to take one; both drive the long-session reminder.
    stretch_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    break_reminded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    user: Mapped[User] = relationship(back_populates="conversations")


class Turn(Base):
    """One message with a role, stored in the order it was received or sent."""

    __tablename__ = "turns"
    __table_args__ = (
        # History reads fetch the newest window of one conversation through this index.
        Index("ix_turns_conversation_time", "conversation_id", "created_at", "id"),
        # The same platform message (and edit revision) is stored once per user and chat.
        UniqueConstraint(
            "user_id",
            "platform_chat_id",
            "platform_message_id",
            "revision",
            name="uq_turns_platform_message",
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    role: Mapped[Role] = mapped_column(
        Enum(
            Role,
            name="turn_role",
            native_enum=False,
            create_constraint=True,
            length=16,
            values_callable=lambda roles: [role.value for role in roles],
        )
    )
    content: Mapped[str] = mapped_column(Text)
    platform_chat_id: Mapped[str | None] = mapped_column(String(64))
    platform_message_id: Mapped[str | None] = mapped_column(String(64))
    # 0 for the message as first sent; each platform edit stores a new revision.
    revision: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Generation facts for assistant turns: model, finish reason, latency, trimming.
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class ProcessedUpdate(Base):
    """A platform update (Telegram update_id, Discord interaction id) already handled once."""

    __tablename__ = "processed_updates"
    __table_args__ = (UniqueConstraint("platform", "update_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    platform: Mapped[str] = mapped_column(String(16))
    update_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CaseStatus(enum.StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


def _string_enum(enum_class: type[enum.StrEnum], name: str) -> Enum:
    return Enum(
        enum_class,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [member.value for member in members],
    )


class SafetyCase(Base):
    """A conversation that needs human attention: open -> acknowledged -> resolved.

    The case keeps the pseudonym, not the platform id, so it can outlive the
    user's data; deleting the user clears ``user_id`` and the excerpt.
    """

    __tablename__ = "safety_cases"
    __table_args__ = (Index("ix_safety_cases_user_status", "user_id", "status"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    conversation_id: Mapped[int | None] = mapped_column(
        ForeignKey("conversations.id", ondelete="SET NULL")
    )
    platform: Mapped[str] = mapped_column(String(16))
    user_pseudonym: Mapped[str] = mapped_column(String(64))
    # The user's reply language when the case opened, for messages sent to them.
    user_locale: Mapped[str] = mapped_column(String(16))
    # "none" is allowed for a case a moderator opens on a hunch.
    level: Mapped[str] = mapped_column(String(16))
    status: Mapped[CaseStatus] = mapped_column(
        _string_enum(CaseStatus, "case_status"), default=CaseStatus.OPEN
    )
    # While True the model stays silent and moderators reply through the bot.
    handoff: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # "system" for risk screening, else "<platform>:<moderator id>".
    opened_by: Mapped[str] = mapped_column(String(80))
    excerpt: Mapped[str | None] = mapped_column(Text)
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    acknowledged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the case was last posted to moderators, and how many posts reached a channel.
    notified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    notify_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))


class CaseAction(Base):
    """One thing that happened to a safety case, with who did it and when."""

    __tablename__ = "safety_case_actions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    case_id: Mapped[int] = mapped_column(
        ForeignKey("safety_cases.id", ondelete="CASCADE"), index=True
    )
    # opened, risk_update, notified, reminded, acknowledged, handoff, reply,
    # resolved, escalated, unreachable, refused
    action: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(80))
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Tombstone(Base):
    """The keyed pseudonym of a deleted user, kept out of every later export and dataset."""

    __tablename__ = "tombstones"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    pseudonym: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ExportRecord(Base):
    """One finished anonymised export; the next export starts where this one ended."""

    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Turns stored in [period_start, period_end) were considered.
    period_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    period_end: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    path: Mapped[str] = mapped_column(Text)
    dialogues: Mapped[int] = mapped_column(Integer)
    turns: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))


class RetentionRun(Base):
    """A retention purge: how many turns older than the cutoff it deleted."""

    __tablename__ = "retention_runs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    ran_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    cutoff: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    turns_deleted: Mapped[int] = mapped_column(Integer)


class JobLock(Base):
    """A lease on a scheduled job, so two scheduler processes never run it at once."""

    __tablename__ = "job_locks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    locked_until: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RubricScore(Base):
    """One judge's rating of one dialogue on the four rubric criteria, or the judge's error."""

    __tablename__ = "rubric_scores"
    __table_args__ = (
        # One stored score per dialogue, judge, prompt, sampling and repeat.
        UniqueConstraint(
            "dialogue_key",
            "judge_model",
            "prompt_version",
            "settings_key",
            "repeat_index",
            name="uq_rubric_scores_identity",
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    dialogue_key: Mapped[str] = mapped_column(String(64), index=True)
    judge_model: Mapped[str] = mapped_column(String(128))
    prompt_version: Mapped[str] = mapped_column(String(32))
    settings_key: Mapped[str] = mapped_column(String(32))
    repeat_index: Mapped[int] = mapped_column(Integer, default=0)
    # export, file or database; "pairs:<pair id>:<better|worse>:<criterion>" for
    # the labelled pairs that check the judge.
    source: Mapped[str] = mapped_column(String(96))
    language: Mapped[str] = mapped_column(String(8))
    dialogue: Mapped[list[dict[str, str]]] = mapped_column(JSON)
    adapter_version: Mapped[str | None] = mapped_column(String(128))
    # None together with ``error`` when the judge gave no usable response.
    scores: Mapped[dict[str, int] | None] = mapped_column(JSON)
    reasons: Mapped[dict[str, str] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    raw: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AdapterStatus(enum.StrEnum):
    CANDIDATE = "candidate"
    PROMOTED = "promoted"
    REJECTED = "rejected"
    # Promoted once, replaced by a later promotion.
    RETIRED = "retired"


class AdapterVersion(Base):
    """One trained LoRA adapter with what it was trained on and how it scored."""

    __tablename__ = "adapter_versions"
    __table_args__ = (
        # At most one promoted version, enforced by the database.
        Index(
            "uq_adapter_versions_promoted",
            "status",
            unique=True,
            sqlite_where=text("status = 'promoted'"),
            postgresql_where=text("status = 'promoted'"),
        ),
    )

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    base_model: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=AdapterStatus.CANDIDATE)
    # The dataset manifest and file hashes, the recipe as written, the training figures.
    data_manifest: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    recipe: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Rubric means per criterion on the held-out dialogues, with counts and judge.
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The promotion rule's verdict and figures, when a retraining run decided.
    decision: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
