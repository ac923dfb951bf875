"""Consent and deletion end to end through the Telegram and Discord adapters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from bots.discord_adapter import DiscordAdapter
from bots.telegram_adapter import TelegramAdapter
from core.config import DatabaseSettings, DiscordSettings, Secrets, Settings, TelegramSettings
from core.service import Service
from core.storage.models import Tombstone, Turn, User
from tests.helpers.discord_standin import DEFAULT_USER, DiscordStandin, redirect_discord_py
from tests.helpers.fakes import FakeGenerator
from tests.helpers.telegram_standin import TelegramStandin, TgUser

ALICE = TgUser(id=1001, first_name="Alice", username="alice", language_code="en")


@pytest.fixture
def consent_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # The shipped default: consent is asked before anything is stored.
    monkeypatch.delenv("MINDHARBOR_PRIVACY__REQUIRE_CONSENT", raising=False)


async def count(service: Service, model) -> int:
    async with service.engine.connect() as connection:
        return (await connection.execute(select(func.count()).select_from(model))).scalar_one()


@pytest.fixture
async def telegram(tmp_path: Path, consent_on: None) -> AsyncIterator[tuple]:
    settings = Settings(database=DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 't.db'}"))
    assert settings.privacy.require_consent
    async with TelegramStandin() as server:
        async with Service(settings, Secrets(), generator=FakeGenerator()) as service:
            adapter = TelegramAdapter(
                manager=service.manager,
                settings=TelegramSettings(api_base_url=server.url, poll_timeout_s=1),
                token=server.token,
            )
            await adapter.start()
            try:
                yield server, service
            finally:
                await adapter.stop()


async def test_telegram_consent_cycle(telegram: tuple) -> None:
    server, service = telegram

    server.enqueue_private_text("hello, rough week", user=ALICE)
    [request] = await server.wait_for_messages(ALICE.id, 1)
    assert "/agree" in request.plain_text
    buttons = request.reply_markup["inline_keyboard"][0]
    assert [button["callback_data"] for button in buttons] == ["consent:agree"]
    assert await count(service, Turn) == 0

    server.enqueue_callback_query("consent:agree", message=request, user=ALICE)
    sent = await server.wait_for_messages(ALICE.id, 2)
    assert sent[-1].plain_text.startswith("Thank you. I'll keep our conversation")

    server.enqueue_private_text("I feel low", user=ALICE)
    sent = await server.wait_for_messages(ALICE.id, 3)
    assert sent[-1].plain_text == "reply to: I feel low"
    assert await count(service, Turn) == 2

    server.enqueue_private_text("/optin", user=ALICE)
    sent = await server.wait_for_messages(ALICE.id, 4)
    assert "/optout" in sent[-1].plain_text
    async with service.engine.connect() as connection:
        consent = (await connection.execute(select(User.training_consent))).scalar_one()
    assert consent is True

    server.enqueue_private_text("/privacy", user=ALICE)
    sent = await server.wait_for_messages(ALICE.id, 5)
    assert "Storing your conversation: yes" in sent[-1].plain_text

    server.enqueue_private_text("/forget", user=ALICE)
    sent = await server.wait_for_messages(ALICE.id, 6)
    server.enqueue_callback_query("forget:yes", message=sent[-1], user=ALICE)
    sent = await server.wait_for_messages(ALICE.id, 7)
    assert "deleted 2 messages" in sent[-1].plain_text
    assert await count(service, Turn) == 0
    assert await count(service, Tombstone) == 1


@pytest.fixture
async def discord(tmp_path: Path, consent_on: None) -> AsyncIterator[tuple]:
    settings = Settings(database=DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'd.db'}"))
    async with DiscordStandin(heartbeat_interval_ms=500) as server:
        with redirect_discord_py(server):
            async with Service(settings, Secrets(), generator=FakeGenerator()) as service:
                adapter = DiscordAdapter(
                    manager=service.manager,
                    settings=DiscordSettings(
                        sync_commands_on_start=True, guild_ready_timeout_s=0.05
                    ),
                    token=server.token,
                )
                await adapter.start()
                try:
                    yield server, service
                finally:
                    await adapter.stop()


async def test_discord_consent_cycle(discord: tuple) -> None:
    server, service = discord
    dm = server.create_dm_channel(DEFAULT_USER)
    bot_id = server.bot.id

    def bot_messages() -> list:
        # Messages the bot sent in the channel, not its responses to slash commands.
        return [
            m for m in server.messages_in(dm.id) if m.author.id == bot_id and m.source == "channel"
        ]

    await server.send_message_create(dm.id, DEFAULT_USER, "hello, rough week")
    await server.wait_for(lambda: len(bot_messages()) >= 1, timeout=10, description="request")
    request = bot_messages()[0]
    assert "/agree" in request.content
    assert request.components, "the consent request carries an I agree button"
    assert await count(service, Turn) == 0

    record = await server.send_interaction_create(dm.id, DEFAULT_USER, "agree")
    await server.wait_for_interaction_responses(record.id, count=2)
    answers = [m.content for m in server.messages if m.interaction_id == record.id and m.content]
    assert answers[-1].startswith("Thank you. I'll keep our conversation")
    await server.send_message_create(dm.id, DEFAULT_USER, "I feel low")
    await server.wait_for(lambda: len(bot_messages()) >= 2, timeout=10, description="reply")

    assert bot_messages()[-1].content == "reply to: I feel low"
    assert await count(service, Turn) == 2
