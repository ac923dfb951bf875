"""The conversation manager: the path of one message from an adapter to a stored reply.

The path has eight steps: (1) find the user and open conversation and drop
duplicates, (2) store the user turn and commit, (3) screen it for risk,
(4) relay to moderators during a hand-off, (5) build the prompt, (6) generate
with a timeout, (7) screen the reply, (8) store the assistant turn. Steps 3, 4
and 7 are not built yet. Their places are marked below, and until they exist
the manager replies without them.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core import i18n
from core.config import SUPPORTED_LOCALES, normalise_locale
from core.errors import GenerationError
from core.generation.base import DeltaCallback, FinishReason, Generator, SamplingParams
from core.generation.postprocess import end_at_sentence
from core.locks import KeyedLocks
from core.prompt import HistoryTurn, PromptBuilder
from core.storage import repository
from core.storage.models import Role
from core.text import sanitize_user_text

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class IncomingMessage:
    """One message from a platform, as an adapter hands it to the core."""

    platform: str
    chat_id: str
    user_id: str
    text: str
    locale_hint: str | None = None
    message_id: str | None = None
    # Platform edit counter: 0 for the message as sent.
    revision: int = 0
    is_moderator: bool = False


class ReplyKind(enum.StrEnum):
    GENERATED = "generated"  # the model's reply, stored as an assistant turn
    DUPLICATE = "duplicate"  # the message was handled before; send nothing
    EMPTY_INPUT = "empty_input"  # no text to reply to; a localized note
    APOLOGY = "apology"  # generation failed or timed out; a localized apology
    NOTICE = "notice"  # the reply to a command (/reset, /lang, /help)
    EDIT_STORED = "edit_stored"  # an edited message stored as a new revision; send nothing


@dataclass(slots=True, kw_only=True)
class Reply:
    kind: ReplyKind
    text: str
    locale: str
    conversation_id: int | None = None
    user_turn_id: int | None = None
    assistant_turn_id: int | None = None
    finish_reason: str | None = None
    latency_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def should_send(self) -> bool:
        silent = (ReplyKind.DUPLICATE, ReplyKind.EDIT_STORED)
        return self.kind not in silent and bool(self.text)


class ConversationManager:
    """Answer messages in order per user and concurrently across users, storing every turn."""

    def __init__(
        self,
        *,
        session_factory: async_sessionmaker[AsyncSession],
        generator: Generator,
        prompt_builder: PromptBuilder,
        sampling: SamplingParams,
        timeout_s: float,
        history_turns: int = 48,
        default_locale: str = "en",
    ) -> None:
        self._sessions = session_factory
        self._generator = generator
        self._prompts = prompt_builder
        self._sampling = sampling
        self._timeout_s = timeout_s
        self._history_turns = history_turns
        self._default_locale = default_locale
        self._user_locks = KeyedLocks()

    # Public API

    async def handle(
        self, message: IncomingMessage, *, on_delta: DeltaCallback | None = None
    ) -> Reply:
        """Store ``message`` as a user turn and return the reply to send (possibly none)."""
        # Per-user order: a second quick message waits until the first is answered.
        async with self._user_locks.hold((message.platform, message.user_id)):
            return await self._handle(message, on_delta)

    async def reset(self, message: IncomingMessage) -> Reply:
        """Close the user's open conversation in this chat; the next message opens a new one."""
        async with self._user_locks.hold((message.platform, message.user_id)):
            async with self._sessions.begin() as session:
                user = await repository.get_or_create_user(
                    session, platform=message.platform, platform_user_id=message.user_id
                )
                await repository.close_open_conversations(
                    session, user_id=user.id, platform_chat_id=message.chat_id
                )
                locale = self._locale_of(user.locale, message.locale_hint)
        return Reply(kind=ReplyKind.NOTICE, text=i18n.text("reset_done", locale), locale=locale)

    async def set_locale(self, message: IncomingMessage, value: str) -> Reply:
        """Set the user's reply language from ``zh``, ``zh-CN``, ``en``..., or explain the usage."""
        requested = normalise_locale(value, default="") if value.strip() else ""
        async with self._user_locks.hold((message.platform, message.user_id)):
            async with self._sessions.begin() as session:
                user = await repository.get_or_create_user(
                    session, platform=message.platform, platform_user_id=message.user_id
                )
                if requested in SUPPORTED_LOCALES:
                    user.locale = requested
                locale = self._locale_of(user.locale, message.locale_hint)
        key = "locale_set" if requested in SUPPORTED_LOCALES else "locale_usage"
        return Reply(kind=ReplyKind.NOTICE, text=i18n.text(key, locale), locale=locale)

    async def user_locale(self, message: IncomingMessage) -> str:
        """Return the locale replies to this user are written in."""
        async with self._sessions() as session:
            user = await repository.get_or_create_user(
                session, platform=message.platform, platform_user_id=message.user_id
            )
            await session.commit()
            return self._locale_of(user.locale, message.locale_hint)

    async def notice(self, message: IncomingMessage, key: str, **values: object) -> Reply:
        """Return a localized notice (help text, unknown command...) for this user."""
        locale = await self.user_locale(message)
        return Reply(kind=ReplyKind.NOTICE, text=i18n.text(key, locale, **values), locale=locale)

    async def handle_edit(self, message: IncomingMessage) -> Reply:
        """Store an edited message as a new revision of its turn, without replying again.

        ``message.revision`` must differ for each edit (Telegram's edit_date
        serves). Prompts use the newest revision in the original turn's place.
        """
        async with self._user_locks.hold((message.platform, message.user_id)):
            text = sanitize_user_text(message.text)
            try:
                async with self._sessions.begin() as session:
                    stored = await self._store_user_turn(session, message, text, history=False)
            except IntegrityError:
                return Reply(kind=ReplyKind.DUPLICATE, text="", locale=self._default_locale)
        kind = ReplyKind.DUPLICATE if stored.duplicate else ReplyKind.EDIT_STORED
        # Screening of the edited text (step 3) goes here.
        return Reply(
            kind=kind,
            text="",
            locale=stored.locale,
            conversation_id=stored.conversation_id,
            user_turn_id=stored.turn_id,
        )

    async def forget(self, message: IncomingMessage) -> Reply:
        """Delete everything stored about the user and report what was deleted."""
        async with self._user_locks.hold((message.platform, message.user_id)):
            locale = await self.user_locale(message)
            async with self._sessions.begin() as session:
                deleted = await repository.delete_user_data(
                    session, platform=message.platform, platform_user_id=message.user_id
                )
        _LOGGER.info(
            "Deleted a %s user's data: %d turns in %d conversations",
            message.platform,
            deleted.turns,
            deleted.conversations,
        )
        text = i18n.text(
            "forget_done", locale, turns=deleted.turns, conversations=deleted.conversations
        )
        return Reply(kind=ReplyKind.NOTICE, text=text, locale=locale)

    async def claim_update(self, platform: str, update_id: str) -> bool:
        """Record a platform update id; False when it was handled before (a redelivery)."""
        async with self._sessions.begin() as session:
            return await repository.claim_update(session, platform=platform, update_id=update_id)

    async def mark_unreachable(self, platform: str, user_id: str) -> None:
        """Note that the platform can no longer deliver messages to this user."""
        async with self._sessions.begin() as session:
            await repository.set_unreachable(
                session, platform=platform, platform_user_id=user_id, unreachable=True
            )
        _LOGGER.warning("A %s user is unreachable (the bot was blocked)", platform)

    # Private API

    def _locale_of(self, stored: str | None, hint: str | None) -> str:
        return stored or normalise_locale(hint, default=self._default_locale)

    async def _handle(self, message: IncomingMessage, on_delta: DeltaCallback | None) -> Reply:
        started = time.perf_counter()
        text = sanitize_user_text(message.text)

        # Steps 1 and 2, plus the history read of step 5, in one transaction:
        # the user turn is committed before any generation starts.
        try:
            async with self._sessions.begin() as session:
                stored = await self._store_user_turn(session, message, text)
        except IntegrityError:
            # Another process stored the same platform message first.
            _LOGGER.info("Dropped duplicate message from platform %r", message.platform)
            return Reply(kind=ReplyKind.DUPLICATE, text="", locale=self._default_locale)
        if stored.duplicate:
            return Reply(
                kind=ReplyKind.DUPLICATE,
                text="",
                locale=stored.locale,
                conversation_id=stored.conversation_id,
            )

        reply = Reply(
            kind=ReplyKind.GENERATED,
            text="",
            locale=stored.locale,
            conversation_id=stored.conversation_id,
            user_turn_id=stored.turn_id,
        )
        if not text.strip():
            reply.kind = ReplyKind.EMPTY_INPUT
            reply.text = i18n.text("empty_message", stored.locale)
            return reply

        # Step 3 (risk screening) and step 4 (hand-off to moderators) go here.

        # Step 5: the prompt.
        built = self._prompts.build(stored.history, stored.locale)

        # Step 6: generation, bounded by the timeout.
        try:
            result = await asyncio.wait_for(
                self._generator.generate(built.messages, self._sampling, on_delta=on_delta),
                timeout=self._timeout_s,
            )
        except (GenerationError, TimeoutError) as exc:
            _LOGGER.warning(
                "Generation failed for conversation %s: %s: %s",
                stored.conversation_id,
                type(exc).__name__,
                exc,
            )
            return self._apology(reply, started)
        except Exception:
            _LOGGER.exception("Generation crashed for conversation %s", stored.conversation_id)
            return self._apology(reply, started)

        if result.finish_reason is FinishReason.LENGTH:
            # A reply cut by max_new_tokens stops mid-sentence; end it at the last full one.
            result.text = end_at_sentence(result.text)
        if not result.text.strip():
            _LOGGER.warning("Empty reply for conversation %s", stored.conversation_id)
            return self._apology(reply, started)

        # Step 7 (reply screening) goes here.

        # Step 8: the assistant turn.
        latency = time.perf_counter() - started
        meta = {
            "model": result.model,
            "finish_reason": result.finish_reason.value,
            "latency_ms": round(latency * 1000, 1),
            "prompt_tokens": built.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "dropped_turns": built.dropped_turns,
            "newest_turn_shortened": built.newest_turn_shortened,
            **{key: value for key, value in result.details.items() if _is_plain(value)},
        }
        async with self._sessions.begin() as session:
            reply.assistant_turn_id = await repository.insert_turn(
                session,
                conversation_id=stored.conversation_id,
                user_id=stored.user_id,
                platform_chat_id=message.chat_id,
                role=Role.ASSISTANT,
                content=result.text,
                meta=meta,
            )

        reply.text = result.text
        reply.finish_reason = result.finish_reason.value
        reply.latency_s = latency
        reply.details = meta
        _LOGGER.info(
            "Replied in conversation %s in %.0f ms (%s)",
            stored.conversation_id,
            latency * 1000,
            result.finish_reason.value,
        )
        return reply

    async def _store_user_turn(
        self, session: AsyncSession, message: IncomingMessage, text: str, *, history: bool = True
    ) -> _StoredTurn:
        found = await repository.find_user_and_conversation(
            session,
            platform=message.platform,
            platform_user_id=message.user_id,
            platform_chat_id=message.chat_id,
            platform_message_id=message.message_id,
            revision=message.revision,
        )
        seen_turn_id = None
        if found is None:
            user = await repository.get_or_create_user(
                session, platform=message.platform, platform_user_id=message.user_id
            )
            user_id, stored_locale, conversation_id = user.id, user.locale, None
        else:
            user_id, stored_locale = found.user_id, found.locale
            conversation_id, seen_turn_id = found.conversation_id, found.seen_turn_id
            if found.unreachable:
                # Writing again proves the user can be reached.
                await repository.set_unreachable(
                    session,
                    platform=message.platform,
                    platform_user_id=message.user_id,
                    unreachable=False,
                )
        if conversation_id is None:
            conversation = await repository.get_open_conversation(
                session, user_id=user_id, platform_chat_id=message.chat_id
            )
            conversation_id = conversation.id
        locale = self._locale_of(stored_locale, message.locale_hint)

        # The same platform message (and revision) is stored once; a repeat is a redelivery.
        if seen_turn_id is not None:
            _LOGGER.info("Dropped duplicate message in conversation %s", conversation_id)
            return _StoredTurn(conversation_id, user_id, seen_turn_id, locale, [], duplicate=True)

        turn_id = await repository.insert_turn(
            session,
            conversation_id=conversation_id,
            user_id=user_id,
            platform_chat_id=message.chat_id,
            role=Role.USER,
            content=text,
            platform_message_id=message.message_id,
            revision=message.revision,
        )
        if not history:
            return _StoredTurn(conversation_id, user_id, turn_id, locale, [])
        rows = await repository.recent_turns(
            session, conversation_id=conversation_id, limit=self._history_turns
        )
        return _StoredTurn(conversation_id, user_id, turn_id, locale, _latest_revisions(rows))

    def _apology(self, reply: Reply, started: float) -> Reply:
        reply.kind = ReplyKind.APOLOGY
        reply.text = i18n.text("apology", reply.locale)
        reply.latency_s = time.perf_counter() - started
        return reply


@dataclass(slots=True)
class _StoredTurn:
    conversation_id: int
    user_id: int
    turn_id: int
    locale: str
    history: list[HistoryTurn]
    duplicate: bool = False


def _latest_revisions(rows: list[repository.TurnRow]) -> list[HistoryTurn]:
    """Turn stored rows into history, each edited message's newest text at its first place."""
    newest: dict[str, str] = {}
    for row in rows:
        if row.platform_message_id is not None and row.revision:
            newest[row.platform_message_id] = row.content

    history = []
    for row in rows:
        if row.revision:
            continue
        content = row.content
        if row.platform_message_id is not None:
            content = newest.get(row.platform_message_id, content)
        history.append(HistoryTurn(row.role.value, content))
    return history


def _is_plain(value: object) -> bool:
    return isinstance(value, str | int | float | bool) or value is None
