"""Safety cases and the moderators who act on them.

The desk opens a case when risk screening finds a crisis (or a moderator
escalates), posts new, escalated and overdue cases to every registered
platform's moderator channel, and carries out moderator commands: list,
acknowledge, hand off, reply, resolve, escalate. Platform adapters register a
``PlatformLink`` so the desk can post to their moderators and send to users
without knowing the platform.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core import i18n
from core.config import SafetySettings
from core.pseudonym import Pseudonymizer
from core.safety.screening import RiskAssessment, RiskLevel
from core.storage import repository
from core.storage.models import (
    CaseAction,
    CaseStatus,
    Conversation,
    Role,
    SafetyCase,
    User,
    as_utc,
    utcnow,
)

_LOGGER = logging.getLogger(__name__)

SYSTEM_ACTOR = "system"

# Moderator actions on one case, by the command names both platforms use.
CASE_ACTIONS = ("ack", "handoff", "reply", "resolve", "escalate")


class Delivery(enum.Enum):
    SENT = "sent"
    # The platform reports that the user blocked the bot or left.
    UNREACHABLE = "unreachable"
    FAILED = "failed"


class PlatformLink(Protocol):
    """An adapter's services to the desk: posting to its moderator channel and sending to users."""

    platform: str

    async def post_to_moderators(self, text: str) -> bool: ...

    async def send_to_user(self, platform_user_id: str, text: str) -> Delivery: ...

    def command_hint(self, case_id: int) -> str:
        """Return how a moderator on this platform acts on the case, for case notices."""
        ...


@dataclass(frozen=True, slots=True)
class Actor:
    """The person running a moderator command; adapters set ``is_moderator`` from roles or ids."""

    platform: str
    user_id: str
    is_moderator: bool

    @property
    def label(self) -> str:
        return f"{self.platform}:{self.user_id}"


@dataclass(frozen=True, slots=True)
class CaseView:
    id: int
    level: str
    status: CaseStatus
    handoff: bool
    platform: str
    pseudonym: str
    excerpt: str
    opened_at: dt.datetime

    @classmethod
    def of(cls, case: SafetyCase) -> CaseView:
        return cls(
            case.id,
            case.level,
            case.status,
            case.handoff,
            case.platform,
            case.user_pseudonym,
            case.excerpt or "",
            case.opened_at,
        )


@dataclass(frozen=True, slots=True)
class _Target:
    """The platform address and locale of the user behind a case."""

    platform: str
    platform_user_id: str
    user_id: int
    locale: str


class SafetyDesk:
    """Open and update safety cases, notify moderators and carry out their commands."""

    def __init__(
        self,
        *,
        session_factory: async_sessionmaker[AsyncSession],
        settings: SafetySettings,
        pseudonyms: Pseudonymizer,
        now: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self._sessions = session_factory
        self._settings = settings
        self._pseudonyms = pseudonyms
        self._now = now
        self._links: dict[str, PlatformLink] = {}
        self._locale = settings.moderator_locale

    # Platform links

    def register_link(self, link: PlatformLink) -> None:
        self._links[link.platform] = link

    def unregister_link(self, platform: str) -> None:
        self._links.pop(platform, None)

    # Risk from the conversation manager

    async def record_risk(
        self,
        *,
        user_id: int,
        platform: str,
        platform_user_id: str,
        conversation_id: int,
        locale: str,
        assessment: RiskAssessment,
        text: str,
    ) -> CaseView | None:
        """Open or update the user's case for a risky turn; return the case, if any.

        One episode has one case: while the user's case is open or
        acknowledged, or was resolved less than ``episode_minutes`` ago, a new
        risky turn updates it instead of opening another. A crisis opens a
        case; an elevated turn only updates an existing one.
        """
        now = self._now()
        excerpt = text[: self._settings.excerpt_chars]
        note = f"{assessment.level.value}: {', '.join(sorted(assessment.categories)) or '-'}"
        notice: str | None = None
        async with self._sessions.begin() as session:
            case = await self._episode_case(session, user_id, now)
            if case is None:
                if assessment.level is not RiskLevel.CRISIS:
                    return None
                case = SafetyCase(
                    user_id=user_id,
                    conversation_id=conversation_id,
                    platform=platform,
                    user_pseudonym=self._pseudonyms.pseudonym(platform, platform_user_id),
                    user_locale=locale,
                    level=assessment.level.value,
                    status=CaseStatus.OPEN,
                    opened_by=SYSTEM_ACTOR,
                    excerpt=excerpt,
                    opened_at=now,
                    updated_at=now,
                )
                session.add(case)
                await session.flush()
                _add_action(session, case.id, "opened", SYSTEM_ACTOR, note, now)
                notice = "case_new"
            else:
                raised = RiskLevel(case.level) < assessment.level
                reopened = case.status is CaseStatus.RESOLVED
                if raised:
                    case.level = assessment.level.value
                    case.excerpt = excerpt
                if reopened:
                    case.status = CaseStatus.OPEN
                    case.resolved_at = None
                    case.acknowledged_at = None
                case.conversation_id = conversation_id
                case.updated_at = now
                action = "reopened" if reopened else "risk_update"
                _add_action(session, case.id, action, SYSTEM_ACTOR, note, now)
                if reopened or (raised and assessment.level is RiskLevel.CRISIS):
                    notice = "case_escalated"
            view = CaseView.of(case)
        if notice is not None:
            await self._notify(view, notice, actor=SYSTEM_ACTOR)
        return view

    async def relay_user_message(self, case_id: int, text: str) -> None:
        """Post a message from a user in hand-off to the moderators."""
        async with self._sessions() as session:
            case = await session.get(SafetyCase, case_id)
            pseudonym = case.user_pseudonym if case is not None else "?"
        await self._post_all(
            i18n.text("case_relay", self._locale, case_id=case_id, pseudonym=pseudonym, text=text)
        )

    # Moderator commands. Each returns the text to show the moderator.

    async def list_cases(self, actor: Actor) -> str:
        if refused := self._refusal(actor, "list"):
            return refused
        async with self._sessions() as session:
            cases = (
                await session.execute(
                    select(SafetyCase)
                    .where(SafetyCase.status != CaseStatus.RESOLVED)
                    .order_by(SafetyCase.id)
                    .limit(50)
                )
            ).scalars()
            lines = [
                i18n.text(
                    "case_list_line",
                    self._locale,
                    case_id=case.id,
                    level=case.level,
                    status=case.status.value,
                    handoff=" · hand-off" if case.handoff else "",
                    platform=case.platform,
                    pseudonym=case.user_pseudonym,
                    opened=case.opened_at.strftime("%Y-%m-%d %H:%M"),
                )
                for case in cases
            ]
        if not lines:
            return i18n.text("case_list_empty", self._locale)
        return "\n".join([i18n.text("case_list_header", self._locale), *lines])

    async def act(self, actor: Actor, action: str, case_id: int, text: str = "") -> str:
        """Run one of CASE_ACTIONS on a case and return the text shown to the moderator.

        `text` is the reply for "reply" and the note for "resolve" and "escalate".
        """
        if action == "ack":
            return await self.acknowledge(actor, case_id)
        if action == "handoff":
            return await self.hand_off(actor, case_id)
        if action == "reply":
            return await self.reply(actor, case_id, text)
        if action == "resolve":
            return await self.resolve(actor, case_id, text)
        if action == "escalate":
            return await self.escalate_case(actor, case_id, text)
        raise ValueError(f"Invalid case action {action!r}: expected one of {CASE_ACTIONS}")

    async def acknowledge(self, actor: Actor, case_id: int) -> str:
        if refused := self._refusal(actor, "acknowledge"):
            return refused
        now = self._now()
        async with self._sessions.begin() as session:
            case = await self._open_case(session, case_id)
            if case is None:
                return self._not_found(case_id)
            if case.status is CaseStatus.OPEN:
                case.status = CaseStatus.ACKNOWLEDGED
                case.acknowledged_at = now
            case.updated_at = now
            _add_action(session, case.id, "acknowledged", actor.label, None, now)
        _LOGGER.info("Case %s acknowledged by %s", case_id, actor.label)
        return i18n.text("case_acknowledged", self._locale, case_id=case_id, actor=actor.label)

    async def hand_off(self, actor: Actor, case_id: int) -> str:
        """Silence the model for the case's user and tell them a person will reply."""
        if refused := self._refusal(actor, "hand off"):
            return refused
        now = self._now()
        async with self._sessions.begin() as session:
            case = await self._open_case(session, case_id)
            if case is None:
                return self._not_found(case_id)
            case.handoff = True
            if case.status is CaseStatus.OPEN:
                case.status = CaseStatus.ACKNOWLEDGED
                case.acknowledged_at = now
            case.updated_at = now
            _add_action(session, case.id, "handoff", actor.label, None, now)
            target = await self._target(session, case)
        _LOGGER.info("Case %s handed off to moderators by %s", case_id, actor.label)
        reply = i18n.text("case_handed_off", self._locale, case_id=case_id, actor=actor.label)
        if target is not None:
            delivery = await self._send_to_user(
                case_id, target, i18n.text("handoff_started", target.locale)
            )
            if delivery is not Delivery.SENT:
                reply += "\n" + i18n.text("case_delivery_failed", self._locale, case_id=case_id)
        return reply

    async def reply(self, actor: Actor, case_id: int, text: str) -> str:
        """Send a moderator's message to the case's user and store it as a moderator turn."""
        if refused := self._refusal(actor, "reply"):
            return refused
        text = text.strip()
        if not text:
            return i18n.text("case_reply_usage", self._locale)
        now = self._now()
        async with self._sessions.begin() as session:
            case = await self._open_case(session, case_id)
            if case is None:
                return self._not_found(case_id)
            target = await self._target(session, case)
            if target is None:
                return i18n.text("case_user_deleted", self._locale, case_id=case_id)
            conversation_id = await self._current_conversation(session, case)
            await repository.insert_turn(
                session,
                conversation_id=conversation_id,
                user_id=target.user_id,
                platform_chat_id=await self._chat_id(session, conversation_id),
                role=Role.MODERATOR,
                content=text,
                meta={"case_id": case_id, "moderator": actor.label},
            )
            case.updated_at = now
            _add_action(session, case.id, "reply", actor.label, None, now)
        delivery = await self._send_to_user(case_id, target, text)
        if delivery is not Delivery.SENT:
            return i18n.text("case_delivery_failed", self._locale, case_id=case_id)
        return i18n.text("case_reply_sent", self._locale, case_id=case_id)

    async def resolve(self, actor: Actor, case_id: int, note: str) -> str:
        """Close the case with a note, after which the model replies to the user again."""
        if refused := self._refusal(actor, "resolve"):
            return refused
        note = note.strip()
        if not note:
            return i18n.text("case_resolve_usage", self._locale)
        now = self._now()
        async with self._sessions.begin() as session:
            case = await self._open_case(session, case_id)
            if case is None:
                return self._not_found(case_id)
            was_handoff = case.handoff
            case.status = CaseStatus.RESOLVED
            case.handoff = False
            case.resolved_at = now
            case.updated_at = now
            _add_action(session, case.id, "resolved", actor.label, note, now)
            target = await self._target(session, case) if was_handoff else None
        _LOGGER.info("Case %s resolved by %s", case_id, actor.label)
        if target is not None:
            await self._send_to_user(case_id, target, i18n.text("handoff_ended", target.locale))
        return i18n.text("case_resolved", self._locale, case_id=case_id, actor=actor.label)

    async def escalate_case(self, actor: Actor, case_id: int, note: str = "") -> str:
        """Raise a case to crisis level and post it to the moderators again."""
        if refused := self._refusal(actor, "escalate"):
            return refused
        now = self._now()
        async with self._sessions.begin() as session:
            case = await self._open_case(session, case_id)
            if case is None:
                return self._not_found(case_id)
            case.level = RiskLevel.CRISIS.value
            case.updated_at = now
            _add_action(session, case.id, "escalated", actor.label, note.strip() or None, now)
            view = CaseView.of(case)
        await self._notify(view, "case_escalated", actor=actor.label)
        return i18n.text("case_escalated_done", self._locale, case_id=case_id)

    async def escalate_user(
        self,
        actor: Actor,
        platform: str,
        platform_user_id: str,
        *,
        note: str = "",
        excerpt: str | None = None,
        known_to_exist: bool = False,
    ) -> str:
        """Open a case on a user (or escalate their open one) on a moderator's judgement.

        A typed id must belong to someone who has written to the bot, so that a
        typo opens nothing. ``known_to_exist`` skips that check for a user the
        platform resolved, such as a context-menu target.
        """
        if refused := self._refusal(actor, "escalate"):
            return refused
        now = self._now()
        async with self._sessions.begin() as session:
            user = (
                await session.execute(
                    select(User).where(
                        User.platform == platform, User.platform_user_id == platform_user_id
                    )
                )
            ).scalar_one_or_none()
            if user is None and not known_to_exist:
                return i18n.text(
                    "case_user_not_found", self._locale, platform=platform, user=platform_user_id
                )
            if user is None:
                user = await repository.get_or_create_user(
                    session, platform=platform, platform_user_id=platform_user_id
                )
            existing = await self._episode_case(session, user.id, now, include_resolved=False)
            if existing is None:
                conversation = (
                    await session.execute(
                        select(Conversation.id)
                        .where(Conversation.user_id == user.id, Conversation.closed_at.is_(None))
                        .order_by(Conversation.id.desc())
                        .limit(1)
                    )
                ).scalar_one_or_none()
                case = SafetyCase(
                    user_id=user.id,
                    conversation_id=conversation,
                    platform=platform,
                    user_pseudonym=self._pseudonyms.pseudonym(platform, platform_user_id),
                    user_locale=user.locale or "en",
                    level=RiskLevel.CRISIS.value,
                    status=CaseStatus.OPEN,
                    opened_by=actor.label,
                    excerpt=(excerpt or note or "")[: self._settings.excerpt_chars] or None,
                    opened_at=now,
                    updated_at=now,
                )
                session.add(case)
                await session.flush()
                _add_action(session, case.id, "opened", actor.label, note.strip() or None, now)
                view = CaseView.of(case)
        if existing is not None:
            # The user already has an open case: escalate that one.
            return await self.escalate_case(actor, existing.id, note)
        await self._notify(view, "case_escalated", actor=actor.label)
        return i18n.text("case_escalated_done", self._locale, case_id=view.id)

    # Reminders

    async def repost_unacknowledged(self) -> int:
        """Post again the open crisis cases not acknowledged in time; return their count."""
        now = self._now()
        cutoff = now - dt.timedelta(seconds=self._settings.renotify_after_s)
        async with self._sessions() as session:
            overdue = list(
                (
                    await session.execute(
                        select(SafetyCase).where(
                            SafetyCase.status == CaseStatus.OPEN,
                            SafetyCase.level == RiskLevel.CRISIS.value,
                            SafetyCase.notified_at.is_not(None),
                            SafetyCase.notified_at <= cutoff,
                        )
                    )
                ).scalars()
            )
            views = [CaseView.of(case) for case in overdue]
        for view in views:
            await self._notify(view, "case_reminder", actor=SYSTEM_ACTOR)
        return len(views)

    async def run_reminders(self, stop: asyncio.Event) -> None:
        """Repost overdue cases every ``renotify_check_interval_s`` until ``stop`` is set."""
        interval = self._settings.renotify_check_interval_s
        while not stop.is_set():
            try:
                await self.repost_unacknowledged()
            except Exception:
                _LOGGER.exception("Checking for unacknowledged safety cases failed")
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
            except TimeoutError:
                continue

    # Private API

    def _refusal(self, actor: Actor, command: str) -> str | None:
        if actor.is_moderator:
            return None
        _LOGGER.warning(
            "Refused moderator command %r from %s: not a moderator", command, actor.label
        )
        return _refused_text()

    def _not_found(self, case_id: int) -> str:
        return i18n.text("case_not_found", self._locale, case_id=case_id)

    async def _episode_case(
        self,
        session: AsyncSession,
        user_id: int,
        now: dt.datetime,
        *,
        include_resolved: bool = True,
    ) -> SafetyCase | None:
        newest = (
            await session.execute(
                select(SafetyCase)
                .where(SafetyCase.user_id == user_id)
                .order_by(SafetyCase.id.desc())
                .limit(1)
            )
        ).scalar_one_or_none()
        if newest is None:
            return None
        if newest.status is not CaseStatus.RESOLVED:
            return newest
        episode = dt.timedelta(minutes=self._settings.episode_minutes)
        resolved_at = as_utc(newest.resolved_at)
        if include_resolved and resolved_at is not None and now - resolved_at < episode:
            return newest
        return None

    async def _open_case(self, session: AsyncSession, case_id: int) -> SafetyCase | None:
        case = await session.get(SafetyCase, case_id)
        if case is None or case.status is CaseStatus.RESOLVED:
            return None
        return case

    async def _target(self, session: AsyncSession, case: SafetyCase) -> _Target | None:
        if case.user_id is None:
            return None
        row = (
            await session.execute(
                select(User.platform, User.platform_user_id, User.locale).where(
                    User.id == case.user_id
                )
            )
        ).first()
        if row is None:
            return None
        return _Target(row[0], row[1], case.user_id, row[2] or case.user_locale)

    async def _current_conversation(self, session: AsyncSession, case: SafetyCase) -> int:
        """Return the case's conversation, or the user's open one when it was closed since."""
        chat_id = None
        if case.conversation_id is not None:
            conversation = await session.get(Conversation, case.conversation_id)
            if conversation is not None and conversation.closed_at is None:
                return conversation.id
            chat_id = conversation.platform_chat_id if conversation is not None else None
        assert case.user_id is not None
        if chat_id is None:
            chat_id = (
                await session.execute(
                    select(Conversation.platform_chat_id)
                    .where(Conversation.user_id == case.user_id)
                    .order_by(Conversation.id.desc())
                    .limit(1)
                )
            ).scalar_one_or_none() or case.platform
        conversation = await repository.get_open_conversation(
            session, user_id=case.user_id, platform_chat_id=chat_id
        )
        return conversation.id

    async def _chat_id(self, session: AsyncSession, conversation_id: int) -> str:
        conversation = await session.get(Conversation, conversation_id)
        assert conversation is not None
        return conversation.platform_chat_id

    async def _send_to_user(self, case_id: int, target: _Target, text: str) -> Delivery:
        link = self._links.get(target.platform)
        if link is None:
            _LOGGER.warning(
                "Case %s: no %s adapter is running to reach the user", case_id, target.platform
            )
            delivery = Delivery.FAILED
        else:
            try:
                delivery = await link.send_to_user(target.platform_user_id, text)
            except Exception:
                _LOGGER.exception("Case %s: sending to the user failed", case_id)
                delivery = Delivery.FAILED
        if delivery is Delivery.UNREACHABLE:
            await self._record_unreachable(case_id, target)
        return delivery

    async def _record_unreachable(self, case_id: int, target: _Target) -> None:
        now = self._now()
        async with self._sessions.begin() as session:
            await session.execute(
                update(User).where(User.id == target.user_id).values(unreachable_at=now)
            )
            _add_action(session, case_id, "unreachable", SYSTEM_ACTOR, None, now)
        _LOGGER.warning("Case %s: the user cannot be reached on %s", case_id, target.platform)
        await self._post_all(i18n.text("case_unreachable", self._locale, case_id=case_id))

    async def _notify(self, case: CaseView, key: str, *, actor: str) -> None:
        """Post a case notice to every moderator channel and record when it went out."""
        posted = 0
        for link in list(self._links.values()):
            text = i18n.text(
                key,
                self._locale,
                case_id=case.id,
                level=case.level,
                platform=case.platform,
                pseudonym=case.pseudonym,
                excerpt=case.excerpt or "-",
                actor=actor,
                minutes=round(self._settings.renotify_after_s / 60),
                commands=link.command_hint(case.id),
            )
            if await self._post(link, text):
                posted += 1
        now = self._now()
        async with self._sessions.begin() as session:
            # notified_at moves on even when no channel took the post, so the
            # reminder loop tries again after renotify_after_s.
            await session.execute(
                update(SafetyCase)
                .where(SafetyCase.id == case.id)
                .values(notified_at=now, notify_count=SafetyCase.notify_count + int(posted > 0))
            )
            action = "reminded" if key == "case_reminder" else "notified"
            _add_action(session, case.id, action, SYSTEM_ACTOR, f"{posted} channel(s)", now)
        if posted == 0:
            _LOGGER.error(
                "Safety case %s (%s) reached no moderator channel; configure "
                "telegram.moderator_chat_id or discord.moderator_channel_id",
                case.id,
                case.level,
            )

    async def _post_all(self, text: str) -> None:
        for link in list(self._links.values()):
            await self._post(link, text)

    async def _post(self, link: PlatformLink, text: str) -> bool:
        try:
            return await link.post_to_moderators(text)
        except Exception:
            _LOGGER.exception("Posting to the %s moderator channel failed", link.platform)
            return False


def _refused_text() -> str:
    # Shown to the person who tried, so it goes out in both languages.
    return i18n.text("moderator_only", "en") + "\n" + i18n.text("moderator_only", "zh-CN")


def _add_action(
    session: AsyncSession,
    case_id: int,
    action: str,
    actor: str,
    note: str | None,
    now: dt.datetime,
) -> None:
    session.add(CaseAction(case_id=case_id, action=action, actor=actor, note=note, created_at=now))
