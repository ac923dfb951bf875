"""Start every platform adapter whose credentials are set, and run until a stop signal."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import signal
from typing import Protocol

from core.config import Secrets
from core.service import Service

_LOGGER = logging.getLogger(__name__)


class AdapterState(enum.Enum):
    """Lifecycle state of a platform adapter."""

    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"


class Adapter(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def configured_adapters(service: Service, secrets: Secrets) -> list[Adapter]:
    """Build the adapters whose credentials are in the environment."""
    adapters: list[Adapter] = []
    if secrets.telegram_bot_token is not None:
        from bots.telegram_adapter import TelegramAdapter

        webhook_secret = secrets.telegram_webhook_secret
        adapters.append(
            TelegramAdapter(
                manager=service.manager,
                settings=service.settings.telegram,
                token=secrets.telegram_bot_token.get_secret_value(),
                webhook_secret=webhook_secret.get_secret_value() if webhook_secret else None,
            )
        )
    if secrets.discord_bot_token is not None:
        from bots.discord_adapter import DiscordAdapter

        adapters.append(
            DiscordAdapter(
                manager=service.manager,
                settings=service.settings.discord,
                token=secrets.discord_bot_token.get_secret_value(),
            )
        )
    return adapters


async def run_until_stopped(adapters: list[Adapter], stop: asyncio.Event | None = None) -> None:
    """Start ``adapters``, wait for SIGINT, SIGTERM or ``stop``, then stop them in reverse order."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal_number, stop.set)

    started: list[Adapter] = []
    try:
        for adapter in adapters:
            await adapter.start()
            started.append(adapter)
        _LOGGER.info("Running %d adapter(s); send SIGINT or SIGTERM to stop", len(started))
        await stop.wait()
    finally:
        for adapter in reversed(started):
            try:
                await adapter.stop()
            except Exception:
                _LOGGER.exception("Stopping adapter %r failed", type(adapter).__name__)
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal_number)
