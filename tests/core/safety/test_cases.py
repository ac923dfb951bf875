"""Risk screening, safety cases and moderator actions through the conversation manager."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select, update

from core.config import BreakReminderSettings, DatabaseSettings, Secrets, Settings
from core.generation.local import LocalGenerator
from core.manager import IncomingMessage, ReplyKind
from core.safety.desk import Actor
from core.safety.screening import RiskLevel
from core.service import Service
from core.storage import db
from core.storage.models import CaseAction, CaseStatus, Conversation, SafetyCase, Turn, User
from tests.helpers.fakes import FakeGenerator, manager_on
from tests.helpers.safety import RecordingLink, build_guard

SYSTEM = {"en": "You are a kind listener.", "zh-CN": "你是一位温和的倾听者。"}
MODERATOR = Actor("console", "mod-1", is_moderator=True)
NOT_A_MODERATOR = Actor("console", "u9", is_moderator=False)
CRISIS_EN = "I saved up all my sleeping pills and tonight I'm taking them"
CRISIS_ZH = "药都攒好了，今晚就结束"


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


class Harness:
    def __init__(
        self, url: str, fixed_crisis_reply: bool = False, **safety_overrides: object
    ) -> None:
        self.engine = db.create_engine(DatabaseSettings(url=url, pool_size=10))
        self.sessions = db.create_session_factory(self.engine)
        self.generator = FakeGenerator(context_length=800)
        self.clock = Clock()
        self.guard = build_guard(self.sessions, now=self.clock, **safety_overrides)
        self.link = RecordingLink()
        self.guard.desk.register_link(self.link)
        self.manager = manager_on(
            self.sessions,
            self.generator,
            system_prompts=SYSTEM,
            safety=self.guard,
            break_reminder=BreakReminderSettings(),
            fixed_crisis_reply=fixed_crisis_reply,
        )
        self.desk = self.guard.desk

    async def cases(self) -> list[SafetyCase]:
        async with self.sessions() as session:
            return list(
                (await session.execute(select(SafetyCase).order_by(SafetyCase.id))).scalars()
            )

    async def actions(self, case_id: int) -> list[tuple[str, str]]:
        async with self.sessions() as session:
            rows = await session.execute(
                select(CaseAction.action, CaseAction.actor)
                .where(CaseAction.case_id == case_id)
                .order_by(CaseAction.id)
            )
            return [tuple(row) for row in rows]

    async def turns(self, user_id: str = "u1") -> list[Turn]:
        async with self.sessions() as session:
            statement = (
                select(Turn)
                .join(User, User.id == Turn.user_id)
                .where(User.platform_user_id == user_id)
                .order_by(Turn.created_at, Turn.id)
            )
            return list((await session.execute(statement)).scalars())


@pytest.fixture
async def harness(database_url: str) -> AsyncIterator[Harness]:
    built = Harness(database_url)
    yield built
    await built.engine.dispose()


def message(text: str, *, user: str = "u1", locale: str | None = "en", **extra) -> IncomingMessage:
    return IncomingMessage(
        platform="console", chat_id="chat", user_id=user, text=text, locale_hint=locale, **extra
    )


async def test_crisis_reply_carries_resources_and_opens_one_case(harness: Harness) -> None:
    reply = await harness.manager.handle(message(CRISIS_EN, locale="en-US"))

    assert reply.kind is ReplyKind.GENERATED
    assert reply.risk_level is RiskLevel.CRISIS
    assert reply.text.startswith("reply to: ")
    assert "988" in reply.text
    assert "findahelpline.com" in reply.text
    cases = await harness.cases()
    assert len(cases) == 1
    assert cases[0].level == "crisis"
    assert cases[0].status is CaseStatus.OPEN
    assert cases[0].excerpt == CRISIS_EN
    assert cases[0].user_pseudonym.startswith("u-")
    assert "u1" not in cases[0].user_pseudonym
    assert len(harness.link.posts) == 1
    assert f"#{cases[0].id}" in harness.link.posts[0]
    assert CRISIS_EN in harness.link.posts[0]
    # The stored assistant turn is what the user read, resources included.
    stored = await harness.turns()
    assert stored[-1].content == reply.text
    assert stored[-1].meta["risk"]["level"] == "crisis"


async def test_fixed_crisis_reply_skips_model(database_url: str) -> None:
    harness = Harness(database_url, fixed_crisis_reply=True)
    try:
        ordinary = await harness.manager.handle(message("I had a long day"))
        reply = await harness.manager.handle(message(CRISIS_EN))
        stored = await harness.turns()
        cases = await harness.cases()
    finally:
        await harness.engine.dispose()

    assert ordinary.kind is ReplyKind.GENERATED
    assert reply.risk_level is RiskLevel.CRISIS
    assert reply.text.startswith("Thank you for telling me.")
    assert "988" in reply.text
    # The model generated a reply to the ordinary message only.
    assert len(harness.generator.calls) == 1
    assert [turn.role.value for turn in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[-1].content == reply.text
    assert stored[-1].meta["crisis_reply"] == "fixed"
    assert len(cases) == 1


async def test_chinese_crisis_gets_mainland_resources(harness: Harness) -> None:
    reply = await harness.manager.handle(message(CRISIS_ZH, locale="zh-hans"))

    assert reply.risk_level is RiskLevel.CRISIS
    assert "12356" in reply.text
    assert "中国大陆" in reply.text
    assert "988" not in reply.text


async def test_more_crisis_messages_update_the_same_case(harness: Harness) -> None:
    await harness.manager.handle(message(CRISIS_EN))
    await harness.manager.handle(message("I wrote my goodbye letters, bye forever"))
    await harness.manager.handle(message("no point in living anyway"))

    cases = await harness.cases()
    assert len(cases) == 1
    assert len(harness.link.posts) == 1
    actions = [action for action, _ in await harness.actions(cases[0].id)]
    assert actions.count("opened") == 1
    assert actions.count("risk_update") == 2


async def test_ordinary_and_idiom_messages_open_no_case(harness: Harness) -> None:
    for text in (
        "this exam is killing me lol",
        "累死了，今天加班到十点",
        "I'm dying to see that movie",
    ):
        reply = await harness.manager.handle(message(text))
        assert reply.risk_level is RiskLevel.NONE
        assert "findahelpline" not in reply.text

    assert await harness.cases() == []
    assert harness.link.posts == []


async def test_crisis_survives_generation_failure(harness: Harness) -> None:
    harness.generator.fail = True

    reply = await harness.manager.handle(message(CRISIS_EN, locale="en-GB"))

    assert reply.kind is ReplyKind.APOLOGY
    assert "116 123" in reply.text
    assert "Thank you for telling me" in reply.text
    assert len(await harness.cases()) == 1


async def test_unsafe_reply_is_replaced(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    harness.generator.reply = "As a licensed therapist, I can tell you this will pass."

    with caplog.at_level(logging.WARNING, logger="core.manager"):
        reply = await harness.manager.handle(message("I had a rough day"))

    assert "licensed therapist" not in reply.text
    assert "I'm an AI" in reply.text
    assert "claims_therapist" in caplog.text
    stored = await harness.turns()
    assert stored[-1].meta["screened"] == ["claims_therapist"]


async def test_full_case_cycle_with_handoff(harness: Harness) -> None:
    await harness.manager.handle(message(CRISIS_EN))
    case_id = (await harness.cases())[0].id

    answer = await harness.desk.acknowledge(MODERATOR, case_id)
    assert f"#{case_id}" in answer
    answer = await harness.desk.hand_off(MODERATOR, case_id)
    assert "hand-off" in answer
    assert harness.link.sent[-1][0] == "u1"
    assert "person from the MindHarbor support team" in harness.link.sent[-1][1]

    # While in hand-off the model is silent and moderators see the message.
    calls = len(harness.generator.calls)
    relayed = await harness.manager.handle(message("is anyone there?"))
    assert relayed.kind is ReplyKind.RELAYED
    assert not relayed.should_send
    assert len(harness.generator.calls) == calls
    assert "is anyone there?" in harness.link.posts[-1]

    answer = await harness.desk.reply(MODERATOR, case_id, "I'm here. Are you safe right now?")
    assert "Sent" in answer
    assert harness.link.sent[-1] == ("u1", "I'm here. Are you safe right now?")
    stored = await harness.turns()
    assert (stored[-1].role.value, stored[-1].content) == (
        "moderator",
        "I'm here. Are you safe right now?",
    )

    answer = await harness.desk.resolve(MODERATOR, case_id, "Talked it through; safety plan made")
    assert "resolved" in answer
    assert "handed our conversation back" in harness.link.sent[-1][1]
    resumed = await harness.manager.handle(message("thank you"))
    assert resumed.kind is ReplyKind.GENERATED
    assert len(harness.generator.calls) == calls + 1
    # The moderator's reply is part of the history the model reads, as the bot's side.
    prompt = harness.generator.calls[-1]
    assert any(turn.role == "assistant" and "Are you safe" in turn.content for turn in prompt)
    actions = [action for action, _ in await harness.actions(case_id)]
    assert actions[:2] == ["opened", "notified"]
    assert {"acknowledged", "handoff", "reply", "resolved"} <= set(actions)
    case = (await harness.cases())[0]
    assert case.status is CaseStatus.RESOLVED
    assert case.handoff is False


async def test_act_dispatches_case_actions(harness: Harness) -> None:
    await harness.manager.handle(message(CRISIS_EN))
    case_id = (await harness.cases())[0].id

    await harness.desk.act(MODERATOR, "ack", case_id)
    await harness.desk.act(MODERATOR, "handoff", case_id)
    await harness.desk.act(MODERATOR, "reply", case_id, "Are you safe right now?")
    await harness.desk.act(MODERATOR, "escalate", case_id, "needs a call")
    await harness.desk.act(MODERATOR, "resolve", case_id, "safety plan made")

    actions = [action for action, _ in await harness.actions(case_id)]
    assert actions[2:] == ["acknowledged", "handoff", "reply", "escalated", "notified", "resolved"]
    assert harness.link.sent[1] == ("u1", "Are you safe right now?")
    with pytest.raises(ValueError, match="close"):
        await harness.desk.act(MODERATOR, "close", case_id)


async def test_non_moderator_is_refused_and_logged(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    await harness.manager.handle(message(CRISIS_EN))
    case_id = (await harness.cases())[0].id

    with caplog.at_level(logging.WARNING, logger="core.safety.desk"):
        answers = [
            await harness.desk.list_cases(NOT_A_MODERATOR),
            await harness.desk.acknowledge(NOT_A_MODERATOR, case_id),
            await harness.desk.hand_off(NOT_A_MODERATOR, case_id),
            await harness.desk.reply(NOT_A_MODERATOR, case_id, "hi"),
            await harness.desk.resolve(NOT_A_MODERATOR, case_id, "done"),
            await harness.desk.escalate_case(NOT_A_MODERATOR, case_id),
        ]

    for answer in answers:
        assert "moderators only" in answer
        assert "管理员" in answer
    assert caplog.text.count("Refused moderator command") == 6
    case = (await harness.cases())[0]
    assert case.status is CaseStatus.OPEN
    assert harness.link.sent == []


async def test_moderator_escalates_a_user(harness: Harness) -> None:
    await harness.manager.handle(message("just a normal day", user="u2"))

    answer = await harness.desk.escalate_user(MODERATOR, "console", "u2", note="worrying DMs")

    cases = await harness.cases()
    assert len(cases) == 1
    assert cases[0].opened_by == "console:mod-1"
    assert cases[0].level == "crisis"
    assert f"#{cases[0].id}" in answer
    assert len(harness.link.posts) == 1
    # A second escalation raises the same case rather than opening another.
    await harness.desk.escalate_user(MODERATOR, "console", "u2")
    assert len(await harness.cases()) == 1
    assert len(harness.link.posts) == 2


async def test_escalating_an_unknown_user_opens_nothing(harness: Harness) -> None:
    answer = await harness.desk.escalate_user(MODERATOR, "console", "no-such-user")

    assert "has written to the bot" in answer
    assert await harness.cases() == []
    assert harness.link.posts == []


async def test_unacknowledged_case_is_posted_again(harness: Harness) -> None:
    await harness.manager.handle(message(CRISIS_EN))
    assert len(harness.link.posts) == 1

    assert await harness.desk.repost_unacknowledged() == 0
    harness.clock.now += dt.timedelta(seconds=901)
    assert await harness.desk.repost_unacknowledged() == 1
    assert "has not been acknowledged" in harness.link.posts[-1]

    case_id = (await harness.cases())[0].id
    await harness.desk.acknowledge(MODERATOR, case_id)
    harness.clock.now += dt.timedelta(seconds=901)
    assert await harness.desk.repost_unacknowledged() == 0
    assert len(harness.link.posts) == 2


async def test_unreachable_user_alerts_moderators(harness: Harness) -> None:
    await harness.manager.handle(message(CRISIS_EN))
    case_id = (await harness.cases())[0].id
    harness.link.blocked.add("u1")

    answer = await harness.desk.hand_off(MODERATOR, case_id)

    assert "could not be delivered" in answer
    assert "cannot be reached" in harness.link.posts[-1]
    assert ("unreachable", "system") in await harness.actions(case_id)
    async with harness.sessions() as session:
        user = (
            await session.execute(select(User).where(User.platform_user_id == "u1"))
        ).scalar_one()
    assert user.unreachable_at is not None


async def test_edit_into_crisis_opens_a_case(harness: Harness) -> None:
    await harness.manager.handle(message("hello", message_id="7"))

    reply = await harness.manager.handle_edit(
        message("hello. I'm going to kill myself tonight", message_id="7", revision=1)
    )

    assert reply.risk_level is RiskLevel.CRISIS
    assert reply.should_send
    assert "findahelpline" in reply.text
    assert len(await harness.cases()) == 1


async def test_risk_across_turns_opens_a_case(harness: Harness) -> None:
    await harness.manager.handle(message("honestly there's no point in living"))
    assert await harness.cases() == []

    reply = await harness.manager.handle(message("went up to the roof of my building again"))

    assert reply.risk_level is RiskLevel.CRISIS
    assert len(await harness.cases()) == 1


async def test_break_reminder_after_two_hours(harness: Harness) -> None:
    first = await harness.manager.handle(message("hi"))
    second = await harness.manager.handle(message("still here"))
    assert "break" not in first.text
    assert "break" not in second.text

    # Two hours and a minute of talk with no pause of 30 minutes.
    async with harness.sessions.begin() as session:
        started = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=121)
        await session.execute(update(Conversation).values(stretch_started_at=started))
    reminded = await harness.manager.handle(message("one more thing"))
    after = await harness.manager.handle(message("and another"))

    assert "take a short break" in reminded.text
    assert "take a short break" not in after.text


async def test_streamed_text_is_screened(harness: Harness) -> None:
    harness.generator.reply = (
        "I hear you, and I'm glad you wrote. As a licensed therapist I can tell you "
        "that this feeling will pass, so let's talk about what happened today."
    )
    shown: list[str] = []

    async def on_delta(delta: str) -> None:
        shown.append(delta)

    reply = await harness.manager.handle(message("I had a rough day"), on_delta=on_delta)

    streamed = "".join(shown)
    assert streamed
    assert harness.generator.reply.startswith(streamed)
    assert "licensed" not in streamed
    assert "licensed therapist" not in reply.text


async def test_safe_stream_is_continued_by_reply(harness: Harness) -> None:
    shown: list[str] = []

    async def on_delta(delta: str) -> None:
        shown.append(delta)

    reply = await harness.manager.handle(message(CRISIS_EN), on_delta=on_delta)

    streamed = "".join(shown)
    # Held-back text and the crisis resources come after what was shown.
    assert streamed
    assert reply.text.startswith(streamed)
    assert "findahelpline.com" in reply.text


@pytest.mark.parametrize(
    ("choice", "embedded", "fixed"),
    [
        ("auto", True, True),
        ("auto", False, False),
        ("generated", True, False),
        ("fixed", False, True),
    ],
)
def test_crisis_reply_choice(choice: str, embedded: bool, fixed: bool) -> None:
    generator = LocalGenerator(model="embedded") if embedded else FakeGenerator()
    settings = Settings(safety={"crisis_reply": choice})

    service = Service(settings, Secrets(), generator=generator)

    assert service._fixed_crisis_reply(settings.safety.crisis_reply) is fixed
