"""Adapters as the health check and the logs see them, against the stand-in platform servers."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bots.discord_adapter import DiscordAdapter
from bots.telegram_adapter import TelegramAdapter
from core.config import DatabaseSettings, DiscordSettings, Secrets, Settings, TelegramSettings
from core.logs import REDACTED, build_handler
from core.service import Service
from tests.helpers.discord_standin import DiscordStandin, redirect_discord_py
from tests.helpers.fakes import FakeGenerator
from tests.helpers.telegram_standin import TelegramStandin, TgUser, conflict_terminated

ALICE = TgUser(id=1001, first_name="Alice", username="alice", language_code="en")
UNIQUE_TEXT = "purple-elephant-4711"


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    settings = Settings(database=DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"))
    async with Service(settings, Secrets(), generator=FakeGenerator()) as running:
        yield running


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` every 10 ms; return whether it became true within ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


def telegram_adapter(server: TelegramStandin, service: Service) -> TelegramAdapter:
    return TelegramAdapter(
        manager=service.manager,
        settings=TelegramSettings(api_base_url=server.url, poll_timeout_s=1),
        token=server.token,
    )


async def test_telegram_connected_follows_polling(service: Service) -> None:
    async with TelegramStandin() as server:
        adapter = telegram_adapter(server, service)
        assert not adapter.is_connected()
        await adapter.start()
        try:
            assert adapter.is_connected()

            server.fail_next("getUpdates", conflict_terminated())
            went_down = await wait_until(lambda: not adapter.is_connected())
            # PTB retries one second after the failure.
            came_back = await wait_until(adapter.is_connected)
        finally:
            await adapter.stop()

    assert went_down
    assert came_back
    assert not adapter.is_connected()


async def test_telegram_logs_hide_token_and_text(service: Service) -> None:
    debug_stream, info_stream = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    async with TelegramStandin() as server:
        debug_handler = build_handler("json", [server.token], debug_stream)
        info_handler = build_handler("json", [server.token], info_stream)
        info_handler.setLevel(logging.INFO)
        root.addHandler(debug_handler)
        root.addHandler(info_handler)
        adapter = telegram_adapter(server, service)
        try:
            await adapter.start()
            server.enqueue_private_text(f"the word is {UNIQUE_TEXT}", user=ALICE)
            [reply] = await server.wait_for_messages(ALICE.id, 1)
            await adapter.stop()
        finally:
            root.removeHandler(debug_handler)
            root.removeHandler(info_handler)
            root.setLevel(level)

    assert UNIQUE_TEXT in reply.text
    debug_output, info_output = debug_stream.getvalue(), info_stream.getvalue()
    # httpx and python-telegram-bot log request URLs, which contain the token.
    assert REDACTED in debug_output
    assert server.token not in debug_output
    assert server.token not in info_output
    assert UNIQUE_TEXT not in info_output
    assert "Telegram adapter started" in info_output
    for line in debug_output.splitlines():
        assert isinstance(json.loads(line), dict)


async def test_discord_connected_follows_gateway(service: Service) -> None:
    async with DiscordStandin(heartbeat_interval_ms=500) as server:
        with redirect_discord_py(server):
            adapter = DiscordAdapter(
                manager=service.manager,
                settings=DiscordSettings(guild_ready_timeout_s=0.05),
                token=server.token,
            )
            assert not adapter.is_connected()
            await adapter.start()
            try:
                connected_at_start = adapter.is_connected()
                # discord.py calls these handlers when the gateway drops and after a resume.
                adapter.client.dispatch("disconnect")
                disconnected = await wait_until(lambda: not adapter.is_connected())
                adapter.client.dispatch("resumed")
                resumed = await wait_until(adapter.is_connected)
            finally:
                await adapter.stop()

    assert connected_at_start
    assert disconnected
    assert resumed
    assert not adapter.is_connected()
