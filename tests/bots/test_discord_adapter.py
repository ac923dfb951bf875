"""The Discord adapter end to end: real discord.py against the stand-in REST API and gateway."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from bots.discord_adapter import DiscordAdapter, MessageContentIntentMissing
from core.config import DatabaseSettings, DiscordSettings, Secrets, Settings
from core.service import Service
from core.storage.models import Turn, User
from tests.helpers.discord_standin import (
    DEFAULT_USER,
    GENERAL_CHANNEL_ID,
    MODERATOR_ROLE_ID,
    SUPPORT_CHANNEL_ID,
    DiscordStandin,
    DiscordUser,
    redirect_discord_py,
)
from tests.helpers.fakes import FakeGenerator

OTHER_BOT = DiscordUser(id=1_200_000_000_000_000_777, username="helper", bot=True)


class Harness:
    def __init__(self, server: DiscordStandin, service: Service, generator: FakeGenerator):
        self.server = server
        self.service = service
        self.generator = generator
        self.adapter: DiscordAdapter | None = None

    async def start_adapter(self, **discord_settings: object) -> DiscordAdapter:
        options: dict[str, object] = {
            "support_channel_ids": [SUPPORT_CHANNEL_ID],
            "sync_commands_on_start": True,
            "guild_ready_timeout_s": 0.05,
            "typing_interval_s": 0.2,
        }
        options.update(discord_settings)
        self.adapter = DiscordAdapter(
            manager=self.service.manager,
            settings=DiscordSettings(**options),
            token=self.server.token,
        )
        await self.adapter.start()
        return self.adapter

    async def user_turns(self, user_id: int) -> list[tuple[str, str]]:
        async with self.service.engine.connect() as connection:
            rows = await connection.execute(
                select(Turn.role, Turn.content)
                .join(User, User.id == Turn.user_id)
                .where(User.platform == "discord", User.platform_user_id == str(user_id))
                .order_by(Turn.created_at, Turn.id)
            )
            return [(str(role), content) for role, content in rows]


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    generator = FakeGenerator()
    settings = Settings(database=DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'dc.db'}"))
    async with DiscordStandin(heartbeat_interval_ms=500) as server:
        with redirect_discord_py(server):
            async with Service(settings, Secrets(), generator=generator) as service:
                built = Harness(server, service, generator)
                yield built
                if built.adapter is not None:
                    await built.adapter.stop()


@pytest.fixture
async def running(harness: Harness) -> Harness:
    await harness.start_adapter()
    return harness


async def replies_in(harness: Harness, channel_id: int, count: int) -> list:
    bot_id = harness.adapter.client.user.id

    def bot_messages() -> list:
        return [m for m in harness.server.messages_in(channel_id) if m.author.id == bot_id]

    await harness.server.wait_for(
        lambda: len(bot_messages()) >= count,
        timeout=10,
        description=f"{count} bot messages in channel {channel_id}",
    )
    return bot_messages()


async def test_direct_message_answered_and_stored(running: Harness) -> None:
    dm = running.server.create_dm_channel(DEFAULT_USER)
    await running.server.send_message_create(dm.id, DEFAULT_USER, "I feel alone tonight")

    [reply] = await replies_in(running, dm.id, 1)

    assert reply.content == "reply to: I feel alone tonight"
    assert await running.user_turns(DEFAULT_USER.id) == [
        ("user", "I feel alone tonight"),
        ("assistant", "reply to: I feel alone tonight"),
    ]


async def test_server_message_needs_mention(running: Harness) -> None:
    bot = running.adapter.client.user
    await running.server.send_message_create(GENERAL_CHANNEL_ID, DEFAULT_USER, "just chatting")
    await running.server.send_message_create(
        GENERAL_CHANNEL_ID, DEFAULT_USER, f"<@{bot.id}> are you there?"
    )

    [reply] = await replies_in(running, GENERAL_CHANNEL_ID, 1)

    assert reply.content == "reply to: are you there?"
    assert [content for role, content in await running.user_turns(DEFAULT_USER.id)] == [
        "are you there?",
        "reply to: are you there?",
    ]


async def test_support_channel_needs_no_mention(running: Harness) -> None:
    await running.server.send_message_create(SUPPORT_CHANNEL_ID, DEFAULT_USER, "rough week")

    [reply] = await replies_in(running, SUPPORT_CHANNEL_ID, 1)

    assert reply.content == "reply to: rough week"


async def test_history_shared_across_dm_and_server(running: Harness) -> None:
    dm = running.server.create_dm_channel(DEFAULT_USER)
    await running.server.send_message_create(dm.id, DEFAULT_USER, "my dog died")
    await replies_in(running, dm.id, 1)
    await running.server.send_message_create(SUPPORT_CHANNEL_ID, DEFAULT_USER, "still sad")
    await replies_in(running, SUPPORT_CHANNEL_ID, 1)

    contents = [message.content for message in running.generator.calls[-1][1:]]
    assert contents == ["my dog died", "reply to: my dog died", "still sad"]


async def test_talk_opens_private_thread(running: Harness) -> None:
    record = await running.server.send_interaction_create(
        GENERAL_CHANNEL_ID, DEFAULT_USER, "talk", options={"message": "I feel lost"}
    )

    await running.server.wait_for(
        lambda: running.server.threads, timeout=10, description="a thread"
    )
    thread = running.server.threads[-1]
    messages = await replies_in(running, thread.id, 2)

    assert thread.type == 12
    assert DEFAULT_USER.mention in messages[0].content
    assert messages[1].content == "reply to: I feel lost"
    responses = await running.server.wait_for_interaction_responses(record.id)
    assert responses[0].callback_type == 5

    await running.server.send_message_create(thread.id, DEFAULT_USER, "thank you")
    third = (await replies_in(running, thread.id, 3))[2]
    assert third.content == "reply to: thank you"


async def test_long_reply_split_at_2000(running: Harness) -> None:
    running.generator.reply = "\n\n".join(["You are not alone in this. " * 30] * 10)
    dm = running.server.create_dm_channel(DEFAULT_USER)
    await running.server.send_message_create(dm.id, DEFAULT_USER, "talk to me")

    await replies_in(running, dm.id, 3)
    await asyncio.sleep(0.3)
    chunks = [m for m in running.server.messages_in(dm.id) if m.author.id != DEFAULT_USER.id]

    assert all(0 < len(chunk.content) <= 2000 for chunk in chunks)
    joined = "".join(chunk.content for chunk in chunks).replace(" ", "").replace("\n", "")
    assert joined == running.generator.reply.replace(" ", "").replace("\n", "")


async def test_model_output_pings_nobody(running: Harness) -> None:
    running.generator.reply = (
        f"@everyone @here <@&{MODERATOR_ROLE_ID}> <@{DEFAULT_USER.id}> look at this"
    )
    await running.server.send_message_create(SUPPORT_CHANNEL_ID, DEFAULT_USER, "hi")

    [reply] = await replies_in(running, SUPPORT_CHANNEL_ID, 1)

    assert reply.allowed_mentions == {"parse": []}
    assert not reply.pings.everyone
    assert reply.pings.users == frozenset()
    assert reply.pings.roles == frozenset()


async def test_bots_ignored_even_with_attachments(running: Harness) -> None:
    await running.server.send_message_create(
        SUPPORT_CHANNEL_ID,
        OTHER_BOT,
        "",
        attachments=[{"id": "1", "filename": "a.png", "size": 10, "url": "http://127.0.0.1/a.png"}],
    )
    await running.server.send_message_create(SUPPORT_CHANNEL_ID, OTHER_BOT, "bot talk")
    await running.server.send_message_create(SUPPORT_CHANNEL_ID, DEFAULT_USER, "human")

    replies = await replies_in(running, SUPPORT_CHANNEL_ID, 1)
    await asyncio.sleep(0.3)

    assert [reply.content for reply in replies] == ["reply to: human"]
    assert await running.user_turns(OTHER_BOT.id) == []


async def test_attachment_only_gets_text_note(running: Harness) -> None:
    dm = running.server.create_dm_channel(DEFAULT_USER)
    await running.server.send_message_create(
        dm.id,
        DEFAULT_USER,
        "",
        attachments=[{"id": "2", "filename": "b.png", "size": 10, "url": "http://127.0.0.1/b.png"}],
    )

    [note] = await replies_in(running, dm.id, 1)

    assert note.content == "I can only read text messages. Please write to me in words."
    assert await running.user_turns(DEFAULT_USER.id) == []


async def test_commands_synced_with_chinese(running: Harness) -> None:
    commands = running.server.commands[None]
    by_name = {command["name"]: command for command in commands}

    assert set(by_name) == {
        "talk",
        "reset",
        "lang",
        "forget",
        "help",
        "case",
        "Escalate to moderators",
        "Escalate message",
        "privacy",
        "agree",
        "withdraw",
        "optin",
        "optout",
    }
    assert (
        by_name["agree"]["description_localizations"]["zh-CN"] == "同意 MindHarbor 保存我们的对话"
    )
    assert by_name["reset"]["description_localizations"]["zh-CN"] == "开始新的对话"
    # Moderator commands are hidden from members without Manage Messages by default.
    assert int(by_name["case"]["default_member_permissions"]) == 1 << 13
    assert [option["name"] for option in by_name["case"]["options"]] == [
        "list",
        "ack",
        "handoff",
        "reply",
        "resolve",
        "escalate",
    ]
    assert by_name["Escalate message"]["type"] == 3


async def test_lang_and_help_commands(running: Harness) -> None:
    lang = await running.server.send_interaction_create(
        GENERAL_CHANNEL_ID, DEFAULT_USER, "lang", options={"language": "zh"}
    )
    await running.server.wait_for_interaction_responses(lang.id, count=2)
    help_record = await running.server.send_interaction_create(
        GENERAL_CHANNEL_ID, DEFAULT_USER, "help"
    )
    await running.server.wait_for_interaction_responses(help_record.id, count=2)

    texts = [message.content for message in running.server.messages if message.ephemeral]
    assert "接下来我会用中文回复你。" in texts
    assert any(text.startswith("可以私信我") for text in texts)


async def test_one_users_messages_in_order(running: Harness) -> None:
    running.generator.delay_s = 0.1
    dm = running.server.create_dm_channel(DEFAULT_USER)
    for text in ("one", "two", "three"):
        await running.server.send_message_create(dm.id, DEFAULT_USER, text)

    replies = await replies_in(running, dm.id, 3)

    assert [reply.content for reply in replies] == [
        "reply to: one",
        "reply to: two",
        "reply to: three",
    ]


async def test_missing_message_content_intent(tmp_path: Path) -> None:
    settings = Settings(database=DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"))
    async with DiscordStandin(intents_allowed=0) as server:
        with redirect_discord_py(server):
            async with Service(settings, Secrets(), generator=FakeGenerator()) as service:
                adapter = DiscordAdapter(
                    manager=service.manager,
                    settings=DiscordSettings(guild_ready_timeout_s=0.05),
                    token=server.token,
                )
                with pytest.raises(MessageContentIntentMissing, match="MESSAGE CONTENT INTENT"):
                    await adapter.start()
                await adapter.client.close()


async def test_streaming_edits_show_reply(harness: Harness) -> None:
    await harness.start_adapter(stream_edits=True, stream_edit_interval_s=1.0)
    harness.generator.reply = " ".join(f"word{index}" for index in range(30))
    harness.generator.stream_delay_s = 0.08
    dm = harness.server.create_dm_channel(DEFAULT_USER)
    await harness.server.send_message_create(dm.id, DEFAULT_USER, "stream please")

    [message] = await replies_in(harness, dm.id, 1)
    await harness.server.wait_for(
        lambda: message.content == harness.generator.reply,
        timeout=10,
        description="the streamed message to show the whole reply",
    )
    await asyncio.sleep(0.3)

    assert 1 <= len(message.edits) <= 4
    assert len(await replies_in(harness, dm.id, 1)) == 1
    assert await harness.user_turns(DEFAULT_USER.id) == [
        ("user", "stream please"),
        ("assistant", harness.generator.reply),
    ]


async def wait_for_generation(generator: FakeGenerator, count: int) -> None:
    async with asyncio.timeout(10):
        while len(generator.calls) < count:
            await asyncio.sleep(0.02)


async def test_shutdown_finishes_reply_in_flight(running: Harness) -> None:
    running.generator.delay_s = 0.5
    late_user = DiscordUser(id=1_200_000_000_000_000_888, username="late")
    dm = running.server.create_dm_channel(DEFAULT_USER)
    await running.server.send_message_create(dm.id, DEFAULT_USER, "Are you still there?")
    await wait_for_generation(running.generator, 1)

    await running.adapter.stop_intake()
    late_dm = running.server.create_dm_channel(late_user)
    await running.server.send_message_create(late_dm.id, late_user, "Hello after the stop")
    cancelled = await running.adapter.drain(10)

    assert cancelled == 0
    assert [m.content for m in running.server.messages_in(dm.id)] == [
        "reply to: Are you still there?"
    ]
    assert running.server.messages_in(late_dm.id) == []
    assert await running.user_turns(late_user.id) == []


async def test_shutdown_grace_cancels_slow_reply(running: Harness) -> None:
    running.generator.hang = True
    dm = running.server.create_dm_channel(DEFAULT_USER)
    await running.server.send_message_create(dm.id, DEFAULT_USER, "Still waiting")
    await wait_for_generation(running.generator, 1)

    await running.adapter.stop_intake()
    cancelled = await running.adapter.drain(0.2)

    assert cancelled == 1
    sent = [message.content for message in running.server.messages_in(dm.id)]
    assert len(sent) == 1
    assert "restarting" in sent[0]
    assert "Your message is saved" in sent[0]
    assert await running.user_turns(DEFAULT_USER.id) == [("user", "Still waiting")]
