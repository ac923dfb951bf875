"""Safety on Discord end to end: crisis replies, the moderators' channel and the case cycle."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bots.discord_adapter import DiscordAdapter
from core.config import DatabaseSettings, DiscordSettings, SafetySettings, Secrets, Settings
from core.service import Service
from core.storage.models import SafetyCase
from tests.helpers.discord_standin import (
    CATEGORY_CHANNEL_ID,
    DEFAULT_MODERATOR,
    DEFAULT_USER,
    GENERAL_CHANNEL_ID,
    MODERATOR_ROLE_ID,
    DiscordStandin,
    GuildChannel,
    default_guild,
    redirect_discord_py,
)
from tests.helpers.fakes import FakeGenerator

MODERATORS_CHANNEL_ID = 1_200_000_000_000_000_250
CRISIS = "I have all my pills lined up and I'm taking them tonight"
SUB_COMMAND = 1
INTEGER = 4
STRING = 3


class Harness:
    def __init__(self, server: DiscordStandin, service: Service, generator: FakeGenerator):
        self.server = server
        self.service = service
        self.generator = generator
        self.adapter: DiscordAdapter | None = None

    def bot_messages(self, channel_id: int) -> list[str]:
        bot_id = self.server.bot.id
        return [
            message.content
            for message in self.server.messages_in(channel_id)
            if message.author.id == bot_id and message.source == "channel"
        ]

    async def wait_for_bot_messages(self, channel_id: int, count: int) -> list[str]:
        await self.server.wait_for(
            lambda: len(self.bot_messages(channel_id)) >= count,
            timeout=10,
            description=f"{count} bot messages in channel {channel_id}",
        )
        return self.bot_messages(channel_id)

    async def case(self, name: str, user: Any = DEFAULT_MODERATOR, **options: Any) -> str:
        """Run ``/case name`` as ``user`` and return the ephemeral follow-up text."""
        inner = [
            {"name": key, "type": INTEGER if isinstance(value, int) else STRING, "value": value}
            for key, value in options.items()
        ]
        record = await self.server.send_interaction_create(
            GENERAL_CHANNEL_ID,
            user,
            "case",
            options=[{"name": name, "type": SUB_COMMAND, "options": inner}],
        )
        return await self.answer_to(record.id)

    async def answer_to(self, interaction_id: int) -> str:
        await self.server.wait_for_interaction_responses(interaction_id, count=2, timeout=10)
        followups = [
            message.content
            for message in self.server.messages
            if message.interaction_id == interaction_id and message.content
        ]
        return followups[-1]

    async def statuses(self) -> list[str]:
        async with self.service.engine.connect() as connection:
            rows = await connection.execute(select(SafetyCase.status).order_by(SafetyCase.id))
            return [status.value for (status,) in rows]


async def start(tmp_path: Path, **safety: object) -> AsyncIterator[Harness]:
    generator = FakeGenerator()
    settings = Settings(
        database=DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'dc.db'}"),
        safety=SafetySettings(**safety),
    )
    guild = default_guild()
    guild.channels.append(
        GuildChannel(id=MODERATORS_CHANNEL_ID, name="moderators", parent_id=CATEGORY_CHANNEL_ID)
    )
    async with DiscordStandin(heartbeat_interval_ms=500, guilds=[guild]) as server:
        with redirect_discord_py(server):
            async with Service(settings, Secrets(), generator=generator) as service:
                harness = Harness(server, service, generator)
                harness.adapter = DiscordAdapter(
                    manager=service.manager,
                    settings=DiscordSettings(
                        sync_commands_on_start=True,
                        guild_ready_timeout_s=0.05,
                        typing_interval_s=0.2,
                        moderator_role_ids=[MODERATOR_ROLE_ID],
                        moderator_channel_id=MODERATORS_CHANNEL_ID,
                    ),
                    token=server.token,
                )
                await harness.adapter.start()
                try:
                    yield harness
                finally:
                    await harness.adapter.stop()


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async for built in start(tmp_path):
        yield built


def case_id_in(post: str) -> int:
    found = re.search(r"#(\d+)", post)
    assert found is not None, post
    return int(found.group(1))


async def test_crisis_dm_gets_resources_and_one_post(harness: Harness) -> None:
    dm = harness.server.create_dm_channel(DEFAULT_USER)
    await harness.server.send_message_create(dm.id, DEFAULT_USER, CRISIS)

    [reply] = await harness.wait_for_bot_messages(dm.id, 1)
    [post] = await harness.wait_for_bot_messages(MODERATORS_CHANNEL_ID, 1)

    assert "findahelpline.com" in reply
    assert "988" in reply
    assert "New safety case" in post
    assert CRISIS in post
    assert "/case ack" in post
    assert str(DEFAULT_USER.id) not in post
    await asyncio.sleep(0.3)
    assert len(harness.bot_messages(MODERATORS_CHANNEL_ID)) == 1


async def test_spoiler_and_fullwidth_crisis_is_screened(harness: Harness) -> None:
    dm = harness.server.create_dm_channel(DEFAULT_USER)
    await harness.server.send_message_create(
        dm.id, DEFAULT_USER, "||ｉ’ｍ ｇｏｎｎａ ｋｉｌｌ ｍｙｓｅｌｆ||"
    )

    [reply] = await harness.wait_for_bot_messages(dm.id, 1)

    assert "findahelpline.com" in reply
    await harness.wait_for_bot_messages(MODERATORS_CHANNEL_ID, 1)


async def test_moderator_case_cycle(harness: Harness) -> None:
    server = harness.server
    dm = server.create_dm_channel(DEFAULT_USER)
    await server.send_message_create(dm.id, DEFAULT_USER, CRISIS)
    [post] = await harness.wait_for_bot_messages(MODERATORS_CHANNEL_ID, 1)
    await harness.wait_for_bot_messages(dm.id, 1)
    case_id = case_id_in(post)

    listing = await harness.case("list")
    assert f"#{case_id} crisis · open" in listing

    assert "acknowledged" in await harness.case("ack", case_id=case_id)
    assert "hand-off" in await harness.case("handoff", case_id=case_id)
    sent = await harness.wait_for_bot_messages(dm.id, 2)
    assert "support team will answer you here" in sent[-1]

    generated = len(harness.generator.calls)
    await server.send_message_create(dm.id, DEFAULT_USER, "hello? anyone?")
    posts = await harness.wait_for_bot_messages(MODERATORS_CHANNEL_ID, 2)
    assert "hello? anyone?" in posts[-1]
    assert len(harness.generator.calls) == generated

    answer = await harness.case("reply", case_id=case_id, message="I'm Mira. Are you safe now?")
    assert "Sent" in answer
    sent = await harness.wait_for_bot_messages(dm.id, 3)
    assert sent[-1] == "I'm Mira. Are you safe now?"

    answer = await harness.case("resolve", case_id=case_id, note="Safety plan agreed")
    assert "resolved" in answer
    sent = await harness.wait_for_bot_messages(dm.id, 4)
    assert "handed our conversation back" in sent[-1]

    await server.send_message_create(dm.id, DEFAULT_USER, "thank you")
    sent = await harness.wait_for_bot_messages(dm.id, 5)
    assert sent[-1] == "reply to: thank you"
    assert await harness.statuses() == ["resolved"]


async def test_non_moderator_is_refused(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    dm = harness.server.create_dm_channel(DEFAULT_USER)
    await harness.server.send_message_create(dm.id, DEFAULT_USER, CRISIS)
    [post] = await harness.wait_for_bot_messages(MODERATORS_CHANNEL_ID, 1)

    with caplog.at_level(logging.WARNING, logger="core.safety.desk"):
        answer = await harness.case("handoff", user=DEFAULT_USER, case_id=case_id_in(post))

    assert "moderators only" in answer
    assert f"from discord:{DEFAULT_USER.id}" in caplog.text
    assert await harness.statuses() == ["open"]


async def test_escalate_message_context_menu(harness: Harness) -> None:
    server = harness.server
    message = await server.send_message_create(
        GENERAL_CHANNEL_ID, DEFAULT_USER, "nobody would notice if I was gone"
    )

    record = await server.send_interaction_create(
        GENERAL_CHANNEL_ID,
        DEFAULT_MODERATOR,
        "Escalate message",
        command_type=3,
        target_id=int(message["id"]),
    )
    answer = await harness.answer_to(record.id)
    [post] = await harness.wait_for_bot_messages(MODERATORS_CHANNEL_ID, 1)

    assert "escalated" in answer
    assert "nobody would notice if I was gone" in post
    assert f"discord:{DEFAULT_MODERATOR.id}" in post
    assert await harness.statuses() == ["open"]


async def test_unacknowledged_case_posted_again(tmp_path: Path) -> None:
    async for harness in start(tmp_path, renotify_after_s=0.3, renotify_check_interval_s=0.1):
        dm = harness.server.create_dm_channel(DEFAULT_USER)
        await harness.server.send_message_create(dm.id, DEFAULT_USER, CRISIS)

        posts = await harness.wait_for_bot_messages(MODERATORS_CHANNEL_ID, 2)

        assert "New safety case" in posts[0]
        assert "has not been acknowledged" in posts[1]


async def test_moderator_channel_chatter_is_not_answered(harness: Harness) -> None:
    await harness.server.send_message_create(
        MODERATORS_CHANNEL_ID, DEFAULT_MODERATOR, f"<@{harness.server.bot.id}> standup at ten"
    )
    await asyncio.sleep(0.5)

    assert harness.bot_messages(MODERATORS_CHANNEL_ID) == []
    assert harness.generator.calls == []
