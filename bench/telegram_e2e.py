"""Benchmark: messages per second and latency through the Telegram adapter and the core.

200 simulated users send 5 messages each through the stand-in Bot API server
(long polling) to a service on SQLite with a generator that answers at once.
Latency is from the moment an update is queued at the stand-in until the
reply is recorded there, so it includes polling, the adapter, the core and
the sendMessage round trip. The stand-in runs in the same process and on the
same cores, so the figures are a lower bound for the bot alone. Target: at
least 200 messages per second on SQLite.

    python bench/telegram_e2e.py [--users 200] [--messages 5]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bots.telegram_adapter import TelegramAdapter
from core.config import DatabaseSettings, Secrets, Settings, TelegramSettings
from core.service import Service
from tests.helpers.fakes import FakeGenerator
from tests.helpers.telegram_standin import TelegramStandin, TgUser


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def run(users: int, messages: int, typing: bool) -> None:
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(
            database=DatabaseSettings(url=f"sqlite+aiosqlite:///{Path(folder) / 'bench.db'}")
        )
        async with (
            TelegramStandin() as server,
            Service(settings, Secrets(), generator=FakeGenerator()) as service,
        ):
            adapter = TelegramAdapter(
                manager=service.manager,
                settings=TelegramSettings(
                    api_base_url=server.url,
                    poll_timeout_s=1,
                    # A long interval sends one typing action per reply, as a fast model would.
                    typing_interval_s=60 if typing else 3600,
                ),
                token=server.token,
            )
            await adapter.start()
            try:
                people = [
                    TgUser(id=10_000 + index, first_name=f"U{index}") for index in range(users)
                ]
                queued: dict[int, list[float]] = {person.id: [] for person in people}
                started = time.perf_counter()
                for round_number in range(messages):
                    for person in people:
                        server.enqueue_private_text(f"message {round_number}", user=person)
                        queued[person.id].append(time.perf_counter())

                total = users * messages
                latencies: list[float] = []
                seen = 0
                answered: dict[int, int] = {person.id: 0 for person in people}
                deadline = started + 300
                while seen < total and time.perf_counter() < deadline:
                    sent = server.sent
                    now = time.perf_counter()
                    for message in sent[seen:]:
                        index = answered[message.chat_id]
                        latencies.append(now - queued[message.chat_id][index])
                        answered[message.chat_id] = index + 1
                    seen = len(sent)
                    await asyncio.sleep(0.002)
                elapsed = time.perf_counter() - started
            finally:
                await adapter.stop()

    print(
        f"{users} users x {messages} messages: {seen} of {total} replies in {elapsed:.2f} s, "
        f"{seen / elapsed:.0f} messages/s; "
        f"latency p50 {statistics.median(latencies) * 1000:.0f} ms, "
        f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--messages", type=int, default=5, help="messages per user")
    parser.add_argument("--no-typing", action="store_true", help="send no typing indicator")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; SQLite; stand-in in the same process"
    )
    asyncio.run(run(args.users, args.messages, typing=not args.no_typing))


if __name__ == "__main__":
    main()
