"""Queries on users, conversations and turns, each taking the caller's session."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core.storage.models import (
    CaseStatus,
    Conversation,
    ProcessedUpdate,
    Role,
    SafetyCase,
    Turn,
    User,
    utcnow,
)


@dataclass(frozen=True, slots=True)
class UserConversation:
    user_id: int
    locale: str | None
    unreachable: bool
    conversation_id: int | None
    # The turn already stored for the platform message asked about, if any.
    seen_turn_id: int | None
    # The user's newest safety case that is not resolved, and whether it is in hand-off.
    active_case_id: int | None = None
    handoff: bool = False
    # Long-session reminder state of the open conversation.
    stretch_started_at: datetime | None = None
    break_reminded_at: datetime | None = None
    storage_consent: bool = False


async def find_user_and_conversation(
    session: AsyncSession,
    *,
    platform: str,
    platform_user_id: str,
    platform_chat_id: str,
    platform_message_id: str | None = None,
    revision: int = 0,
) -> UserConversation | None:
    """Find a returning user, their open conversation, a stored copy of the message
    and their active safety case.

    One query does all of it, because it runs for every message. Returns None
    for a user never seen before.
    """
    seen = (
        select(Turn.id)
        .where(
            Turn.user_id == User.id,
            Turn.platform_chat_id == platform_chat_id,
            Turn.platform_message_id == platform_message_id,
            Turn.revision == revision,
        )
        .limit(1)
        .scalar_subquery()
        if platform_message_id is not None
        else None
    )
    newest_case = (
        select(SafetyCase.id, SafetyCase.handoff)
        .where(SafetyCase.user_id == User.id, SafetyCase.status != CaseStatus.RESOLVED)
        .order_by(SafetyCase.id.desc())
        .limit(1)
    )
    case_id = newest_case.with_only_columns(SafetyCase.id).scalar_subquery()
    handoff = newest_case.with_only_columns(SafetyCase.handoff).scalar_subquery()
    statement = (
        select(
            User.id,
            User.locale,
            User.unreachable_at,
            Conversation.id,
            seen,
            case_id,
            handoff,
            Conversation.stretch_started_at,
            Conversation.break_reminded_at,
            User.storage_consent_at,
        )
        .outerjoin(
            Conversation,
            (Conversation.user_id == User.id)
            & (Conversation.platform_chat_id == platform_chat_id)
            & Conversation.closed_at.is_(None),
        )
        .where(User.platform == platform, User.platform_user_id == platform_user_id)
    )
    row = (await session.execute(statement)).first()
    if row is None:
        return None
    return UserConversation(
        row[0],
        row[1],
        row[2] is not None,
        row[3],
        row[4],
        row[5],
        bool(row[6]),
        row[7],
        row[8],
        row[9] is not None,
    )


async def find_user(session: AsyncSession, *, platform: str, platform_user_id: str) -> User | None:
    statement = select(User).where(
        User.platform == platform, User.platform_user_id == platform_user_id
    )
    return (await session.execute(statement)).scalar_one_or_none()


async def get_or_create_user(
    session: AsyncSession, *, platform: str, platform_user_id: str
) -> User:
    statement = select(User).where(
        User.platform == platform, User.platform_user_id == platform_user_id
    )
    user = (await session.execute(statement)).scalar_one_or_none()
    if user is not None:
        return user

    # Another process may create the same user between the select and the
    # insert; the savepoint lets us read its row instead of failing.
    try:
        async with session.begin_nested():
            user = User(platform=platform, platform_user_id=platform_user_id)
            session.add(user)
    except IntegrityError:
        user = (await session.execute(statement)).scalar_one()
    return user


async def get_open_conversation(
    session: AsyncSession, *, user_id: int, platform_chat_id: str
) -> Conversation:
    statement = select(Conversation).where(
        Conversation.user_id == user_id,
        Conversation.platform_chat_id == platform_chat_id,
        Conversation.closed_at.is_(None),
    )
    conversation = (await session.execute(statement)).scalar_one_or_none()
    if conversation is not None:
        return conversation

    try:
        async with session.begin_nested():
            conversation = Conversation(user_id=user_id, platform_chat_id=platform_chat_id)
            session.add(conversation)
    except IntegrityError:
        conversation = (await session.execute(statement)).scalar_one()
    return conversation


async def close_open_conversations(
    session: AsyncSession, *, user_id: int, platform_chat_id: str
) -> int:
    result = await session.execute(
        update(Conversation)
        .where(
            Conversation.user_id == user_id,
            Conversation.platform_chat_id == platform_chat_id,
            Conversation.closed_at.is_(None),
        )
        .values(closed_at=utcnow())
    )
    return result.rowcount or 0


def add_turn(
    session: AsyncSession,
    *,
    conversation: Conversation,
    role: Role,
    content: str,
    platform_message_id: str | None = None,
    revision: int = 0,
    meta: dict[str, Any] | None = None,
) -> Turn:
    turn = Turn(
        conversation_id=conversation.id,
        user_id=conversation.user_id,
        role=role,
        content=content,
        platform_chat_id=conversation.platform_chat_id,
        platform_message_id=platform_message_id,
        revision=revision,
        meta=meta,
    )
    session.add(turn)
    return turn


async def insert_turn(
    session: AsyncSession,
    *,
    conversation_id: int,
    user_id: int,
    platform_chat_id: str,
    role: Role,
    content: str,
    platform_message_id: str | None = None,
    revision: int = 0,
    meta: dict[str, Any] | None = None,
) -> int:
    """Insert a turn without loading ORM objects (the per-message path) and return its id."""
    statement = (
        insert(Turn)
        .values(
            conversation_id=conversation_id,
            user_id=user_id,
            role=role,
            content=content,
            platform_chat_id=platform_chat_id,
            platform_message_id=platform_message_id,
            revision=revision,
            created_at=utcnow(),
            meta=meta,
        )
        .returning(Turn.id)
    )
    return (await session.execute(statement)).scalar_one()


@dataclass(frozen=True, slots=True)
class TurnRow:
    role: Role
    content: str
    platform_message_id: str | None
    revision: int
    created_at: datetime


async def recent_turns(session: AsyncSession, *, conversation_id: int, limit: int) -> list[TurnRow]:
    """Return the newest ``limit`` turns of a conversation, oldest first."""
    statement = (
        select(Turn.role, Turn.content, Turn.platform_message_id, Turn.revision, Turn.created_at)
        .where(Turn.conversation_id == conversation_id)
        .order_by(Turn.created_at.desc(), Turn.id.desc())
        .limit(limit)
    )
    rows = [TurnRow(*row) for row in await session.execute(statement)]
    rows.reverse()
    return rows


async def set_unreachable(
    session: AsyncSession, *, platform: str, platform_user_id: str, unreachable: bool
) -> None:
    await session.execute(
        update(User)
        .where(User.platform == platform, User.platform_user_id == platform_user_id)
        .values(unreachable_at=utcnow() if unreachable else None)
    )


async def claim_update(session: AsyncSession, *, platform: str, update_id: str) -> bool:
    """Record a platform update as handled; False when it was recorded before."""
    # One statement on both backends: the insert is skipped, not failed, on a repeat.
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    statement = (
        dialect_insert(ProcessedUpdate)
        .values(platform=platform, update_id=update_id, created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["platform", "update_id"])
    )
    result = await session.execute(statement)
    return bool(result.rowcount)


@dataclass(frozen=True, slots=True)
class DeletedData:
    turns: int
    conversations: int


async def delete_user_data(
    session: AsyncSession, *, platform: str, platform_user_id: str
) -> DeletedData:
    """Delete a user with every conversation and turn of theirs; return what was deleted."""
    user_id = (
        await session.execute(
            select(User.id).where(
                User.platform == platform, User.platform_user_id == platform_user_id
            )
        )
    ).scalar_one_or_none()
    if user_id is None:
        return DeletedData(0, 0)

    turns = (
        await session.execute(select(func.count(Turn.id)).where(Turn.user_id == user_id))
    ).scalar_one()
    conversations = (
        await session.execute(
            select(func.count(Conversation.id)).where(Conversation.user_id == user_id)
        )
    ).scalar_one()
    # Safety cases keep their skeleton for audit, without the user's words or link to them.
    await session.execute(
        update(SafetyCase)
        .where(SafetyCase.user_id == user_id)
        .values(user_id=None, conversation_id=None, excerpt=None)
    )
    # Explicit deletes in child-to-parent order, so SQLite needs no cascade support.
    await session.execute(delete(Turn).where(Turn.user_id == user_id))
    await session.execute(delete(Conversation).where(Conversation.user_id == user_id))
    await session.execute(delete(User).where(User.id == user_id))
    return DeletedData(turns, conversations)
