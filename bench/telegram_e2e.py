"""Benchmark: messages per second and latency through the Telegram adapter and the core.

200 simulated users send 5 messages each through the stand-in Bot API server
(long polling) to a service on SQLite with a generator that answers at once.
The stand-in and the load run in a child process, as Telegram's servers are
elsewhere in production; the bot runs in this process. Latency is from the
moment an update is queued at the stand-in until the reply is recorded there,
so it includes polling, the adapter, the core and the sendMessage round trip.
Target: at least 200 messages per second on SQLite.

NOTE: on 2 x86_64 cores this measured 103 (Telegram) and 172 (Discord)
messages per second on 2026-12-04, below the target; see the README's
performance section for the cause.

    python bench/telegram_e2e.py [--users 200] [--messages 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_load import collect_replies, describe, serve_until_stdin_closes

from tests.helpers.telegram_standin import TelegramStandin, TgUser

# The child process: stand-in server and load.


async def drive_load(users: int, messages: int) -> None:
    async with TelegramStandin() as server:
        print(json.dumps({"url": server.url, "token": server.token}), flush=True)
        # The bot registers its commands once it is up; start the load then.
        await server.wait_for(lambda: server.commands_for(""), timeout=120, description="bot start")

        people = [TgUser(id=10_000 + index, first_name=f"U{index}") for index in range(users)]
        queued: dict[int, list[float]] = {person.id: [] for person in people}
        started = time.perf_counter()
        for round_number in range(messages):
            for person in people:
                server.enqueue_private_text(f"message {round_number}", user=person)
                queued[person.id].append(time.perf_counter())

        await collect_replies(lambda: server.sent, lambda message: message.chat_id, queued, started)
        await serve_until_stdin_closes()


# The parent process: the bot.


async def run_bot(users: int, messages: int) -> None:
    from bots.telegram_adapter import TelegramAdapter
    from core.config import DatabaseSettings, Secrets, Settings, TelegramSettings
    from core.service import Service
    from tests.helpers.fakes import FakeGenerator

    child = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--role",
        "load",
        "--users",
        str(users),
        "--messages",
        str(messages),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None and child.stdin is not None
    address = json.loads(await child.stdout.readline())

    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(
            database=DatabaseSettings(url=f"sqlite+aiosqlite:///{Path(folder) / 'bench.db'}")
        )
        async with Service(settings, Secrets(), generator=FakeGenerator()) as service:
            adapter = TelegramAdapter(
                manager=service.manager,
                settings=TelegramSettings(api_base_url=address["url"], poll_timeout_s=1),
                token=address["token"],
            )
            await adapter.start()
            try:
                result = json.loads(await child.stdout.readline())
            finally:
                await adapter.stop()
    child.stdin.close()
    await child.wait()

    print(describe(users, messages, result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--messages", type=int, default=5, help="messages per user")
    parser.add_argument("--role", choices=["bot", "load"], default="bot", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if args.role == "load":
        asyncio.run(drive_load(args.users, args.messages))
        return
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; SQLite; stand-in and load in a child process"
    )
    asyncio.run(run_bot(args.users, args.messages))


if __name__ == "__main__":
    main()
