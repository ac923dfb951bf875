"""Start every platform adapter whose credentials are set, and run until a stop signal.

Shutdown happens in three steps. The first SIGINT or SIGTERM makes every
adapter stop taking new messages, then the replies already in flight get up to
``shutdown_grace_s`` seconds to finish and be stored, then the adapters close.
A reply still running at that limit is cancelled, and its user gets a short
notice that the message is saved. A second signal ends the process at once
(see ``_exit_now``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

from bots.lifecycle import Adapter
from core.config import Secrets
from core.service import Service

_LOGGER = logging.getLogger(__name__)


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


async def run_until_stopped(
    adapters: list[Adapter], stop: asyncio.Event | None = None, *, grace_s: float = 30.0
) -> None:
    """Start ``adapters`` and run until SIGINT, SIGTERM or ``stop``, then shut down gracefully.

    After the first signal (or ``stop``), the adapters stop taking messages and
    the replies in flight get ``grace_s`` seconds to finish. A second signal
    exits the process at once.

    NOTE: with the local generator, a batch that already runs in its worker
    thread cannot be cancelled, so the process exits only after that batch,
    even when the grace ran out.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signal_number: int) -> None:
        name = signal.Signals(signal_number).name
        if stop.is_set():
            _exit_now(name, 128 + signal_number)
        _LOGGER.info(
            "Received %s: finishing the replies in flight (up to %g s); send it again to "
            "exit at once",
            name,
            grace_s,
        )
        stop.set()

    for signal_number in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal_number, on_signal, signal_number)

    started: list[Adapter] = []
    try:
        for adapter in adapters:
            await adapter.start()
            started.append(adapter)
        _LOGGER.info("Running %d adapter(s); send SIGINT or SIGTERM to stop", len(started))
        await stop.wait()
        await _drain(started, grace_s)
    finally:
        for adapter in reversed(started):
            try:
                await adapter.stop()
            except Exception:
                _LOGGER.exception("Stopping adapter %r failed", type(adapter).__name__)
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal_number)


async def _drain(adapters: list[Adapter], grace_s: float) -> None:
    """Stop intake on every adapter first, then wait for all of their handlers at once."""
    for adapter in adapters:
        try:
            await adapter.stop_intake()
        except Exception:
            _LOGGER.exception("Stopping the intake of adapter %r failed", type(adapter).__name__)
    _LOGGER.info("Stopped taking new messages; waiting up to %g s for replies in flight", grace_s)

    results = await asyncio.gather(
        *(adapter.drain(grace_s) for adapter in adapters), return_exceptions=True
    )
    cancelled = 0
    for adapter, result in zip(adapters, results, strict=True):
        if isinstance(result, BaseException):
            _LOGGER.error(
                "Waiting for the replies of adapter %r failed",
                type(adapter).__name__,
                exc_info=result,
            )
        else:
            cancelled += result
    if cancelled:
        # The manager commits each user turn before generating, so these turns stay
        # stored. Their users got the reply_cut_by_restart notice instead of a reply.
        _LOGGER.warning(
            "The shutdown grace of %g s ran out: cancelled %d replies in flight", grace_s, cancelled
        )
    else:
        _LOGGER.info("Every reply in flight finished")


def _exit_now(signal_name: str, exit_code: int) -> None:
    """End the process at once, without waiting for handlers or closing connections.

    The database stays consistent because every write is a transaction that is
    committed or not at all. On SQLite in WAL mode, a transaction without its
    commit record in the WAL file is ignored when the file is next opened, and
    committed transactions are in the file or the WAL (synchronous=NORMAL only
    risks them on power loss, not when a process dies). PostgreSQL rolls back
    the open transactions of a connection that closes.
    """
    _LOGGER.warning("Received %s again: exiting now, without waiting for replies", signal_name)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(exit_code)
