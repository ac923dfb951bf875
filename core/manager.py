"""The conversation manager: the path of one message from an adapter to a stored reply.

The path has eight steps: (1) find the user and open conversation and drop
duplicates, (2) store the user turn and commit, (3) screen it for risk and open
or update a safety case, (4) relay to moderators during a hand-off, (5) build
the prompt, (6) generate with a timeout, (7) screen the reply, (8) store the
assistant turn. Without a ``SafetyGuard`` steps 3, 4 and 7 are skipped, which
only tests of the other steps do.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core import i18n
from core.config import SUPPORTED_LOCALES, BreakReminderSettings, normalise_locale
from core.errors import GenerationError
from core.generation.base import DeltaCallback, FinishReason, Generator, SamplingParams
from core.generation.postprocess import end_at_sentence
from core.locks import KeyedLocks
from core.observability import METRICS, Metrics
from core.privacy.export import add_tombstone
from core.prompt import HistoryTurn, PromptBuilder
from core.pseudonym import Pseudonymizer
from core.safety.screening import NO_RISK, RiskAssessment, RiskLevel
from core.storage import repository
from core.storage.conversation_lock import ConversationLocks
from core.storage.models import Conversation, Role, Tombstone, as_utc, utcnow
from core.text import sanitize_user_text

if TYPE_CHECKING:
    from core.safety.guard import SafetyGuard

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
    RELAYED = "relayed"  # the user's case is in hand-off; moderators got the message
    CONSENT_REQUIRED = "consent_required"  # nothing stored; the user is asked to agree first


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
    # Risk level of the user's turn; a crisis reply carries the crisis resources.
    risk_level: RiskLevel = RiskLevel.NONE
    case_id: int | None = None

    @property
    def should_send(self) -> bool:
        silent = (ReplyKind.DUPLICATE, ReplyKind.EDIT_STORED, ReplyKind.RELAYED)
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
        safety: SafetyGuard | None = None,
        break_reminder: BreakReminderSettings | None = None,
        pseudonyms: Pseudonymizer | None = None,
        require_consent: bool = False,
        retention_days: int | None = None,
        metrics: Metrics | None = None,
        conversation_locks: ConversationLocks | None = None,
        fixed_crisis_reply: bool = False,
    ) -> None:
        self._sessions = session_factory
        self._generator = generator
        self._prompts = prompt_builder
        self._sampling = sampling
        self._timeout_s = timeout_s
        self._history_turns = history_turns
        self._default_locale = default_locale
        self._user_locks = KeyedLocks()
        self._safety = safety
        self._break_reminder = break_reminder
        # Deleted users' pseudonyms become tombstones that keep them out of exports.
        self._pseudonyms = pseudonyms
        # With require_consent, no turn is stored before the user agrees, except a
        # crisis, which is stored under the safety case's legal basis.
        self._require_consent = require_consent
        self._retention_days = retention_days
        # Keeps a user's turns in order across bot processes on PostgreSQL.
        self._conversation_locks = conversation_locks or ConversationLocks(None)
        self._metrics = metrics or METRICS
        # A crisis-level message gets a fixed message and the resources, without the model.
        self._fixed_crisis_reply = fixed_crisis_reply

    @property
    def safety(self) -> SafetyGuard | None:
        return self._safety

    # Public API

    async def handle(
        self, message: IncomingMessage, *, on_delta: DeltaCallback | None = None
    ) -> Reply:
        """Store ``message`` as a user turn and return the reply to send (possibly none)."""
        received_at = time.perf_counter()
        self._metrics.record_received(message.platform)
        # Per-user order: a second quick message waits until the first is answered.
        async with self._hold_user(message):
            reply = await self._handle(message, on_delta)
        if reply.should_send:
            self._metrics.record_reply(message.platform, time.perf_counter() - received_at)
        return reply

    async def reset(self, message: IncomingMessage) -> Reply:
        """Close the user's open conversation in this chat; the next message opens a new one."""
        async with self._hold_user(message):
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
        async with self._hold_user(message):
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
        async with self._hold_user(message):
            text = sanitize_user_text(message.text)
            try:
                async with self._sessions.begin() as session:
                    stored = await self._store_user_turn(session, message, text, history=False)
            except IntegrityError:
                return Reply(kind=ReplyKind.DUPLICATE, text="", locale=self._default_locale)
        if stored.consent_missing:
            # Nothing is stored for a user who has not agreed; the edit is dropped.
            return Reply(kind=ReplyKind.CONSENT_REQUIRED, text="", locale=stored.locale)
        kind = ReplyKind.DUPLICATE if stored.duplicate else ReplyKind.EDIT_STORED
        if not stored.duplicate and text.strip():
            # An edit can turn a harmless message into a crisis. The case is posted to
            # moderators, and the user gets the crisis resources without a new model reply.
            assessment, case_id = await self._screen(message, stored, text)
            if assessment.level is RiskLevel.CRISIS and self._safety is not None:
                return Reply(
                    kind=ReplyKind.NOTICE,
                    text=self._crisis_message(stored.locale, message.locale_hint),
                    locale=stored.locale,
                    conversation_id=stored.conversation_id,
                    user_turn_id=stored.turn_id,
                    risk_level=assessment.level,
                    case_id=case_id,
                )
        return Reply(
            kind=kind,
            text="",
            locale=stored.locale,
            conversation_id=stored.conversation_id,
            user_turn_id=stored.turn_id,
        )

    async def forget(self, message: IncomingMessage) -> Reply:
        """Delete everything stored about the user and report what was deleted."""
        # The database lock keeps another process from storing a reply after the deletion.
        async with self._hold_user(message):
            locale = await self.user_locale(message)
            async with self._sessions.begin() as session:
                deleted = await repository.delete_user_data(
                    session, platform=message.platform, platform_user_id=message.user_id
                )
                if self._pseudonyms is not None:
                    pseudonym = self._pseudonyms.pseudonym(message.platform, message.user_id)
                    await add_tombstone(session, pseudonym)
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

    async def needs_consent(self, message: IncomingMessage) -> bool:
        """Return True when the user must agree to storage before their turns are kept."""
        if not self._require_consent:
            return False
        async with self._sessions() as session:
            user = await repository.find_user(
                session, platform=message.platform, platform_user_id=message.user_id
            )
        return user is None or user.storage_consent_at is None

    async def privacy_notice(self, message: IncomingMessage) -> Reply:
        """Explain what is stored, for how long, and the user's current choices."""
        async with self._sessions() as session:
            user = await repository.find_user(
                session, platform=message.platform, platform_user_id=message.user_id
            )
            deleted_before = await self._deleted_before(session, message)
        locale = self._locale_of(user.locale if user else None, message.locale_hint)
        yes, no = i18n.text("privacy_yes", locale), i18n.text("privacy_no", locale)
        storage = user is not None and user.storage_consent_at is not None
        training = user is not None and user.training_consent and not deleted_before
        text = i18n.text(
            "privacy_notice",
            locale,
            storage=yes if storage or not self._require_consent else no,
            training=yes if training else no,
            retention_days=self._retention_days or "-",
        )
        return Reply(kind=ReplyKind.NOTICE, text=text, locale=locale)

    async def set_storage_consent(self, message: IncomingMessage, granted: bool) -> Reply:
        """Record that the user agreed to storage, or withdrew it (with training consent)."""
        async with self._hold_user(message):
            async with self._sessions.begin() as session:
                user = await repository.get_or_create_user(
                    session, platform=message.platform, platform_user_id=message.user_id
                )
                now = utcnow()
                if granted:
                    user.storage_consent_at = user.storage_consent_at or now
                else:
                    user.storage_consent_at = None
                    if user.training_consent:
                        user.training_consent = False
                        user.training_consent_at = now
                locale = self._locale_of(user.locale, message.locale_hint)
        _LOGGER.info(
            "A %s user %s storage consent", message.platform, "gave" if granted else "withdrew"
        )
        key = "consent_given" if granted else "consent_withdrawn"
        return Reply(kind=ReplyKind.NOTICE, text=i18n.text(key, locale), locale=locale)

    async def set_training_consent(self, message: IncomingMessage, granted: bool) -> Reply:
        """Turn the use of the user's conversations for training on or off, at once."""
        async with self._hold_user(message):
            async with self._sessions.begin() as session:
                user = await repository.get_or_create_user(
                    session, platform=message.platform, platform_user_id=message.user_id
                )
                locale = self._locale_of(user.locale, message.locale_hint)
                if granted and self._require_consent and user.storage_consent_at is None:
                    key = "optin_needs_storage"
                elif granted and await self._deleted_before(session, message):
                    # Exports and datasets leave out every pseudonym that asked for deletion.
                    key = "optin_after_forget"
                else:
                    user.training_consent = granted
                    user.training_consent_at = utcnow()
                    key = "optin_done" if granted else "optout_done"
        return Reply(kind=ReplyKind.NOTICE, text=i18n.text(key, locale), locale=locale)

    # Private API

    async def _deleted_before(self, session: AsyncSession, message: IncomingMessage) -> bool:
        """Return whether a tombstone shows that this user deleted their data (/forget) before."""
        if self._pseudonyms is None:
            return False
        pseudonym = self._pseudonyms.pseudonym(message.platform, message.user_id)
        found = await session.scalar(select(Tombstone.id).where(Tombstone.pseudonym == pseudonym))
        return found is not None

    @contextlib.asynccontextmanager
    async def _hold_user(self, message: IncomingMessage) -> AsyncIterator[None]:
        """Hold the user's lock in this process and, on PostgreSQL, across bot processes.

        Every change to a user's turns, conversations or settings takes it, so that
        a change made in one process never lands inside another's store, generate
        and store sequence.
        """
        async with (
            self._user_locks.hold((message.platform, message.user_id)),
            self._conversation_locks.hold(message.platform, message.user_id),
        ):
            yield

    def _is_crisis_without_history(self, text: str) -> bool:
        if self._safety is None or not text.strip():
            return False
        return self._safety.screener.screen(text).level is RiskLevel.CRISIS

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
        if stored.consent_missing:
            return Reply(
                kind=ReplyKind.CONSENT_REQUIRED,
                text=i18n.text("consent_request", stored.locale),
                locale=stored.locale,
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

        # Step 3: risk screening, which opens or updates a safety case.
        assessment, case_id = await self._screen(message, stored, text)
        reply.risk_level, reply.case_id = assessment.level, case_id

        if stored.legal_basis is not None and self._safety is not None:
            # Stored without consent because of the crisis. The resources and a fixed
            # message go out at once, and the turn is never sent to the model.
            reply.kind = ReplyKind.NOTICE
            crisis = self._crisis_message(stored.locale, message.locale_hint)
            reply.text = f"{crisis}\n\n{i18n.text('consent_after_crisis', stored.locale)}"
            return reply

        # Step 4: during a hand-off, moderators reply instead of the model.
        if stored.handoff or (case_id is not None and await self._in_handoff(case_id)):
            assert self._safety is not None and case_id is not None
            await self._safety.desk.relay_user_message(case_id, text)
            reply.kind = ReplyKind.RELAYED
            return reply

        if (
            self._fixed_crisis_reply
            and assessment.level is RiskLevel.CRISIS
            and self._safety is not None
        ):
            return await self._fixed_crisis(reply, stored, message, assessment, started)

        # Step 5: the prompt, with a note for the model when the user may be at risk.
        note = None
        if self._safety is not None and assessment.level is not RiskLevel.NONE:
            note = self._safety.guidance_for(assessment.level, stored.locale)
        built = self._prompts.build(stored.history, stored.locale, system_note=note)

        # Step 6: generation, bounded by the timeout. Streamed text passes the
        # reply rules before the user sees it.
        if on_delta is not None and self._safety is not None:
            on_delta = self._safety.screened_stream(on_delta, assessment.level)
        try:
            result = await asyncio.wait_for(
                self._generator.generate(built.messages, self._sampling, on_delta=on_delta),
                timeout=self._timeout_s,
            )
        except (GenerationError, TimeoutError) as exc:
            # GenerationTimeout is a TimeoutError too.
            timed_out = isinstance(exc, TimeoutError)
            self._metrics.record_generation_error(timed_out=timed_out)
            # asyncio's own timeout error has an empty message.
            detail = str(exc) or (f"timed out after {self._timeout_s:g} s" if timed_out else "")
            _LOGGER.warning(
                "Generation failed for conversation %s: %s: %s",
                stored.conversation_id,
                type(exc).__name__,
                detail,
            )
            return self._apology(reply, started, message)
        except Exception:
            self._metrics.record_generation_error(timed_out=False)
            _LOGGER.exception("Generation crashed for conversation %s", stored.conversation_id)
            return self._apology(reply, started, message)

        if result.finish_reason is FinishReason.LENGTH:
            # A reply cut by max_new_tokens stops mid-sentence; end it at the last full one.
            result.text = end_at_sentence(result.text)
        if not result.text.strip():
            _LOGGER.warning("Empty reply for conversation %s", stored.conversation_id)
            return self._apology(reply, started, message)

        # Step 7: reply screening. A reply that could hurt never reaches the user.
        screened: list[str] = []
        if self._safety is not None:
            verdict = await self._safety.screen_reply(result.text, assessment.level, text)
            if verdict.unsafe:
                screened = list(verdict.categories)
                _LOGGER.warning(
                    "Replaced an unsafe reply in conversation %s (%s)",
                    stored.conversation_id,
                    ", ".join(screened),
                )
                result.text = i18n.text("safety_fallback", stored.locale)

        # Step 8: the assistant turn, as the user reads it.
        text_out = result.text
        if assessment.level is RiskLevel.CRISIS and self._safety is not None:
            resources = self._safety.crisis_resources(stored.locale, message.locale_hint)
            text_out = f"{text_out}\n\n{resources}"
        now = utcnow()
        reminder = self._break_reminder_due(stored, now)
        if reminder:
            text_out = f"{text_out}\n\n{i18n.text('break_reminder', stored.locale)}"
        latency = time.perf_counter() - started
        meta = {
            "model": result.model,
            "finish_reason": result.finish_reason.value,
            "latency_ms": round(latency * 1000, 1),
            "prompt_tokens": built.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "dropped_turns": built.dropped_turns,
            "newest_turn_shortened": built.newest_turn_shortened,
            "risk": assessment.summary(),
            **({"screened": screened} if screened else {}),
            **({"break_reminder": True} if reminder else {}),
            **{key: value for key, value in result.details.items() if _is_plain(value)},
        }
        async with self._sessions.begin() as session:
            reply.assistant_turn_id = await self._insert_reply(
                session, stored, message, text_out, meta
            )
            await self._update_stretch(session, stored, now, reminder)

        reply.text = text_out
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
        legal_basis = None
        if self._require_consent and (found is None or not found.storage_consent):
            locale = self._locale_of(found.locale if found else None, message.locale_hint)
            if not self._is_crisis_without_history(text):
                return _StoredTurn(0, 0, 0, locale, [], consent_missing=True)
            legal_basis = "vital_interests"
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
            meta={"legal_basis": legal_basis} if legal_basis else None,
        )
        stored = _StoredTurn(conversation_id, user_id, turn_id, locale, [])
        stored.legal_basis = legal_basis
        if found is not None:
            stored.case_id, stored.handoff = found.active_case_id, found.handoff
            stored.stretch_started_at = as_utc(found.stretch_started_at)
            stored.break_reminded_at = as_utc(found.break_reminded_at)
        if not history:
            return stored
        rows = await repository.recent_turns(
            session, conversation_id=conversation_id, limit=self._history_turns
        )
        stored.history = _latest_revisions(rows)
        if len(rows) >= 2:
            stored.previous_turn_at = as_utc(rows[-2].created_at)
        return stored

    async def _fixed_crisis(
        self,
        reply: Reply,
        stored: _StoredTurn,
        message: IncomingMessage,
        assessment: RiskAssessment,
        started: float,
    ) -> Reply:
        """Reply to a crisis with the fixed crisis message and the resources, stored as a turn."""
        text = self._crisis_message(stored.locale, message.locale_hint)
        meta = {"crisis_reply": "fixed", "risk": assessment.summary()}
        async with self._sessions.begin() as session:
            reply.assistant_turn_id = await self._insert_reply(session, stored, message, text, meta)
        reply.kind = ReplyKind.NOTICE
        reply.text = text
        reply.details = meta
        reply.latency_s = time.perf_counter() - started
        _LOGGER.info(
            "Answered a crisis in conversation %s with the fixed message", stored.conversation_id
        )
        return reply

    async def _insert_reply(
        self,
        session: AsyncSession,
        stored: _StoredTurn,
        message: IncomingMessage,
        text: str,
        meta: dict[str, Any],
    ) -> int:
        """Store the reply the user reads as an assistant turn and return its id."""
        return await repository.insert_turn(
            session,
            conversation_id=stored.conversation_id,
            user_id=stored.user_id,
            platform_chat_id=message.chat_id,
            role=Role.ASSISTANT,
            content=text,
            meta=meta,
        )

    def _crisis_message(self, locale: str, locale_hint: str | None) -> str:
        """Return the fixed crisis message followed by the crisis resources for the user."""
        assert self._safety is not None
        resources = self._safety.crisis_resources(locale, locale_hint)
        return f"{i18n.text('crisis_fallback', locale)}\n\n{resources}"

    def _apology(self, reply: Reply, started: float, message: IncomingMessage) -> Reply:
        reply.kind = ReplyKind.APOLOGY
        reply.latency_s = time.perf_counter() - started
        if reply.risk_level is RiskLevel.CRISIS and self._safety is not None:
            # A failed generation never leaves a user in crisis without the resources.
            reply.text = self._crisis_message(reply.locale, message.locale_hint)
        else:
            reply.text = i18n.text("apology", reply.locale)
        return reply

    async def _screen(
        self, message: IncomingMessage, stored: _StoredTurn, text: str
    ) -> tuple[RiskAssessment, int | None]:
        """Screen a stored user turn; open or update a case; return the level and the case id."""
        if self._safety is None:
            return NO_RISK, stored.case_id
        earlier = [turn.content for turn in stored.history[:-1] if turn.role == Role.USER.value]
        assessment = await self._safety.assess(text, earlier)
        if assessment.level is RiskLevel.NONE:
            return assessment, stored.case_id
        if assessment.level is RiskLevel.ELEVATED and stored.case_id is None:
            return assessment, None
        case = await self._safety.desk.record_risk(
            user_id=stored.user_id,
            platform=message.platform,
            platform_user_id=message.user_id,
            conversation_id=stored.conversation_id,
            locale=stored.locale,
            assessment=assessment,
            text=text,
        )
        _LOGGER.info(
            "Risk %s in conversation %s (%s); case %s",
            assessment.level.value,
            stored.conversation_id,
            ", ".join(sorted(assessment.categories)) or "-",
            case.id if case is not None else None,
        )
        return assessment, case.id if case is not None else stored.case_id

    async def _in_handoff(self, case_id: int) -> bool:
        from core.storage.models import SafetyCase

        async with self._sessions() as session:
            case = await session.get(SafetyCase, case_id)
            return case is not None and case.handoff

    def _break_reminder_due(self, stored: _StoredTurn, now: dt.datetime) -> bool:
        """Return True when the conversation has run ``after_minutes`` without a break."""
        settings = self._break_reminder
        if settings is None or not settings.enabled or stored.stretch_started_at is None:
            return False
        if stored.previous_turn_at is None:
            return False
        if now - stored.previous_turn_at >= dt.timedelta(minutes=settings.break_minutes):
            return False
        since = stored.stretch_started_at
        if stored.break_reminded_at is not None and stored.break_reminded_at > since:
            since = stored.break_reminded_at
        return now - since >= dt.timedelta(minutes=settings.after_minutes)

    async def _update_stretch(
        self, session: AsyncSession, stored: _StoredTurn, now: dt.datetime, reminded: bool
    ) -> None:
        """Start a new stretch after a break, and record a reminder; writes only on a change."""
        settings = self._break_reminder
        if settings is None or not settings.enabled:
            return
        values: dict[str, dt.datetime] = {}
        gap = dt.timedelta(minutes=settings.break_minutes)
        if (
            stored.stretch_started_at is None
            or stored.previous_turn_at is None
            or now - stored.previous_turn_at >= gap
        ):
            values["stretch_started_at"] = now
        if reminded:
            values["break_reminded_at"] = now
        if values:
            await session.execute(
                update(Conversation)
                .where(Conversation.id == stored.conversation_id)
                .values(**values)
            )


@dataclass(slots=True)
class _StoredTurn:
    conversation_id: int
    user_id: int
    turn_id: int
    locale: str
    history: list[HistoryTurn]
    duplicate: bool = False
    case_id: int | None = None
    handoff: bool = False
    stretch_started_at: dt.datetime | None = None
    break_reminded_at: dt.datetime | None = None
    # When the turn before this one was stored; None in a new conversation.
    previous_turn_at: dt.datetime | None = None
    # True when nothing was stored because the user has not agreed to storage.
    consent_missing: bool = False
    # Set when the turn was stored without consent, for the safety of the user.
    legal_basis: str | None = None


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
