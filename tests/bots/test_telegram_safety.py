"""Safety on Telegram end to end: crisis replies, the moderators' group and the case cycle."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from bots.telegram_adapter import TelegramAdapter
from core.config import DatabaseSettings, SafetySettings, Secrets, Settings, TelegramSettings
from core.service import Service
from core.storage.models import SafetyCase
from tests.helpers.fakes import FakeGenerator
from tests.helpers.telegram_standin import TelegramStandin, TgUser

ALICE = TgUser(id=1001, first_name="Alice", username="alice", language_code="en")
BO = TgUser(id=1002, first_name="波", username="bo", language_code="zh-hans")
MIRA = TgUser(id=2001, first_name="Mira", username="mod_mira", language_code="en")
EVE = TgUser(id=2002, first_name="Eve", username="eve", language_code="en")
MODERATORS_CHAT = -1009990001
CRISIS = "I have all my pills lined up and I'm taking them tonight"


class Harness:
    def __init__(self, server: TelegramStandin, service: Service, generator: FakeGenerator):
        self.server = server
        self.service = service
        self.generator = generator

    def moderator_posts(self) -> list[str]:
        return [m.plain_text for m in self.server.sent if m.chat_id == MODERATORS_CHAT]

    async def cases(self) -> list[SafetyCase]:
        async with self.service.engine.connect() as connection:
            rows = await connection.execute(select(SafetyCase.id, SafetyCase.status))
            return list(rows)

    async def wait_for_posts(self, count: int, timeout: float = 5.0) -> list[str]:
        await self.server.wait_for_messages(MODERATORS_CHAT, count, timeout=timeout)
        return self.moderator_posts()

    def command(self, text: str, user: TgUser = MIRA) -> None:
        self.server.enqueue_group_text(
            text, user=user, chat_id=MODERATORS_CHAT, title="MindHarbor moderators"
        )


async def start(tmp_path: Path, **safety: object) -> AsyncIterator[Harness]:
    generator = FakeGenerator()
    settings = Settings(
        database=DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'tg.db'}"),
        safety=SafetySettings(**safety),
    )
    async with TelegramStandin() as server:
        server.add_group_chat(MODERATORS_CHAT, "MindHarbor moderators")
        async with Service(settings, Secrets(), generator=generator) as service:
            adapter = TelegramAdapter(
                manager=service.manager,
                settings=TelegramSettings(
                    api_base_url=server.url,
                    poll_timeout_s=1,
                    moderator_ids=[MIRA.id],
                    moderator_chat_id=MODERATORS_CHAT,
                ),
                token=server.token,
            )
            await adapter.start()
            try:
                yield Harness(server, service, generator)
            finally:
                await adapter.stop()


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async for built in start(tmp_path):
        yield built


def case_id_in(post: str) -> int:
    found = re.search(r"#(\d+)", post)
    assert found is not None, post
    return int(found.group(1))


async def test_crisis_gets_resources_and_one_moderator_post(harness: Harness) -> None:
    harness.server.enqueue_private_text(CRISIS, user=ALICE)

    [reply] = await harness.server.wait_for_messages(ALICE.id, 1)
    [post] = await harness.wait_for_posts(1)

    assert reply.plain_text.startswith("reply to: ")
    assert "988" in reply.plain_text
    assert "116 123" in reply.plain_text
    assert "findahelpline.com" in reply.plain_text
    assert "New safety case" in post
    assert CRISIS in post
    assert "/ack" in post
    # The moderators see a pseudonym, never the Telegram id.
    assert str(ALICE.id) not in post
    await asyncio.sleep(0.3)
    assert len(harness.moderator_posts()) == 1


async def test_chinese_crisis_reply_in_chinese(harness: Harness) -> None:
    harness.server.enqueue_private_text("药都攒好了，今晚就结束吧", user=BO)

    [reply] = await harness.server.wait_for_messages(BO.id, 1)

    assert "12356" in reply.plain_text
    assert "你不必独自面对" in reply.plain_text


async def test_spoiler_hidden_crisis_is_screened(harness: Harness) -> None:
    text = "it's fine. I'm going to kill myself tonight"
    start = text.index("I'm")
    harness.server.enqueue_private_text(
        text,
        user=ALICE,
        entities=[{"type": "spoiler", "offset": start, "length": len(text) - start}],
    )

    [reply] = await harness.server.wait_for_messages(ALICE.id, 1)

    assert "findahelpline.com" in reply.plain_text
    await harness.wait_for_posts(1)


async def test_moderator_case_cycle(harness: Harness) -> None:
    server = harness.server
    server.enqueue_private_text(CRISIS, user=ALICE)
    [post] = await harness.wait_for_posts(1)
    case_id = case_id_in(post)

    harness.command("/cases")
    posts = await harness.wait_for_posts(2)
    assert f"#{case_id} crisis · open" in posts[-1]

    harness.command(f"/ack {case_id}")
    posts = await harness.wait_for_posts(3)
    assert "acknowledged by telegram:2001" in posts[-1]

    harness.command(f"/handoff {case_id}")
    sent = await server.wait_for_messages(ALICE.id, 2)
    assert "support team will answer you here" in sent[-1].plain_text

    generated = len(harness.generator.calls)
    server.enqueue_private_text("hello? is someone there", user=ALICE)
    posts = await harness.wait_for_posts(5)
    assert any("hello? is someone there" in text for text in posts)
    assert len(harness.generator.calls) == generated

    harness.command(f"/reply {case_id} Hi, I'm Mira from the team.\nAre you safe right now?")
    sent = await server.wait_for_messages(ALICE.id, 3)
    assert sent[-1].plain_text == "Hi, I'm Mira from the team.\nAre you safe right now?"

    harness.command(f"/resolve {case_id} Safety plan agreed; sister is with her")
    sent = await server.wait_for_messages(ALICE.id, 4)
    assert "handed our conversation back" in sent[-1].plain_text

    server.enqueue_private_text("thanks, I feel a bit better", user=ALICE)
    sent = await server.wait_for_messages(ALICE.id, 5)
    assert sent[-1].plain_text == "reply to: thanks, I feel a bit better"
    assert [status.value for _, status in await harness.cases()] == ["resolved"]


async def test_non_moderator_is_refused(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    harness.server.enqueue_private_text(CRISIS, user=ALICE)
    [post] = await harness.wait_for_posts(1)
    await harness.server.wait_for_messages(ALICE.id, 1)
    case_id = case_id_in(post)

    with caplog.at_level(logging.WARNING, logger="core.safety.desk"):
        harness.command(f"/handoff {case_id}", user=EVE)
        posts = await harness.wait_for_posts(2)

    assert "moderators only" in posts[-1]
    assert "Refused moderator command 'hand off' from telegram:2002" in caplog.text
    assert [status.value for _, status in await harness.cases()] == ["open"]
    assert len(harness.server.sent_to(ALICE.id)) == 1


async def test_moderator_escalates_a_user(harness: Harness) -> None:
    harness.server.enqueue_private_text("just had a normal day", user=ALICE)
    await harness.server.wait_for_messages(ALICE.id, 1)

    harness.command(f"/escalate user {ALICE.id} worrying messages in the group")
    posts = await harness.wait_for_posts(2)

    assert any("is now crisis (telegram:2001)" in text for text in posts)
    assert any("escalated and posted" in text for text in posts)
    assert len(await harness.cases()) == 1


async def test_unacknowledged_case_posted_again(tmp_path: Path) -> None:
    async for harness in start(tmp_path, renotify_after_s=0.3, renotify_check_interval_s=0.1):
        harness.server.enqueue_private_text(CRISIS, user=ALICE)
        posts = await harness.wait_for_posts(2, timeout=5.0)

        assert "New safety case" in posts[0]
        assert "has not been acknowledged" in posts[1]
        assert case_id_in(posts[0]) == case_id_in(posts[1])


async def test_blocked_user_on_handoff_alerts_moderators(harness: Harness) -> None:
    harness.server.enqueue_private_text(CRISIS, user=ALICE)
    [post] = await harness.wait_for_posts(1)
    harness.server.block_chat(ALICE.id)

    harness.command(f"/handoff {case_id_in(post)}")
    posts = await harness.wait_for_posts(3)

    assert any("cannot be reached" in text for text in posts)
    assert any("could not be delivered" in text for text in posts)


async def test_moderator_chat_chatter_is_not_answered(harness: Harness) -> None:
    harness.command(f"@{harness.server.bot_username} what's on the agenda today?")
    await harness.server.wait_until_consumed()
    await asyncio.sleep(0.3)

    assert harness.moderator_posts() == []
    assert harness.generator.calls == []


async def test_case_commands_in_moderator_chat_menu(harness: Harness) -> None:
    scope = {"type": "chat", "chat_id": MODERATORS_CHAT}
    names = [command["command"] for command in harness.server.commands_for("", scope=scope)]

    assert names == ["cases", "ack", "handoff", "reply", "resolve", "escalate"]
