"""Queries on users, conversations and turns, each taking the caller's session."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core.storage.models import Conversation, Role, Turn, User, utcnow


async def find_user_and_conversation(
    session: AsyncSession, *, platform: str, platform_user_id: str, platform_chat_id: str
) -> tuple[int, str | None, int | None] | None:
    """Return (user id, locale, open conversation id or None), or None for a new user."""
    statement = (
        select(User.id, User.locale, Conversation.id)
        .outerjoin(
            Conversation,
            (Conversation.user_id == User.id)
            & (Conversation.platform_chat_id == platform_chat_id)
            & Conversation.closed_at.is_(None),
        )
        .where(User.platform == platform, User.platform_user_id == platform_user_id)
    )
    row = (await session.execute(statement)).first()
    return None if row is None else (row[0], row[1], row[2])


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


async def find_turn_by_message(
    session: AsyncSession,
    *,
    user_id: int,
    platform_chat_id: str,
    platform_message_id: str,
    revision: int = 0,
) -> int | None:
    """Return the id of the turn stored for this platform message and revision, if any."""
    statement = select(Turn.id).where(
        Turn.user_id == user_id,
        Turn.platform_chat_id == platform_chat_id,
        Turn.platform_message_id == platform_message_id,
        Turn.revision == revision,
    )
    return (await session.execute(statement)).scalar_one_or_none()


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


async def recent_turns(
    session: AsyncSession, *, conversation_id: int, limit: int
) -> list[tuple[Role, str]]:
    """Return (role, content) of the newest ``limit`` turns of a conversation, oldest first."""
    statement = (
        select(Turn.role, Turn.content)
        .where(Turn.conversation_id == conversation_id)
        .order_by(Turn.created_at.desc(), Turn.id.desc())
        .limit(limit)
    )
    rows = [(row[0], row[1]) for row in await session.execute(statement)]
    rows.reverse()
    return rows


async def conversation_turns(session: AsyncSession, *, conversation_id: int) -> Sequence[Turn]:
    """Return every turn of a conversation, oldest first."""
    statement = (
        select(Turn)
        .where(Turn.conversation_id == conversation_id)
        .order_by(Turn.created_at, Turn.id)
    )
    return list((await session.execute(statement)).scalars())
