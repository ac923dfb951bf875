"""Benchmark: messages per second and latency through the Discord adapter and the core.

200 simulated users send 5 direct messages each through the stand-in Discord
gateway to a service on SQLite with a generator that answers at once.
The stand-in and the load run in a child process, as Telegram's servers are
elsewhere in production; the bot runs in this process. Latency is from the
moment an update is queued at the stand-in until the reply is recorded there,
so it includes polling, the adapter, the core and the sendMessage round trip.
Target: at least 200 messages per second on SQLite.

NOTE: on 2 x86_64 cores this measured 103 (Telegram) and 172 (Discord)
messages per second on 2026-12-04, below the target; see the README's
performance section for the cause.

    python bench/discord_e2e.py [--users 200] [--messages 5]
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

from tests.helpers.discord_standin import DiscordStandin, DiscordUser

# The child process: stand-in server and load.


async def drive_load(users: int, messages: int) -> None:
    async with DiscordStandin(heartbeat_interval_ms=5000) as server:
        print(
            json.dumps(
                {"api": server.api_base, "gateway": server.gateway_url, "token": server.token}
            ),
            flush=True,
        )
        await server.wait_until_connected(timeout=120)

        people = [
            DiscordUser(id=1_400_000_000_000_000_000 + index, username=f"u{index}")
            for index in range(users)
        ]
        channels = {}
        for person in people:
            server.add_user(person)
            channels[person.id] = server.create_dm_channel(person).id
        bot_id = server.bot.id

        queued: dict[int, list[float]] = {channel: [] for channel in channels.values()}
        started = time.perf_counter()
        for round_number in range(messages):
            for person in people:
                channel = channels[person.id]
                await server.send_message_create(channel, person, f"message {round_number}")
                queued[channel].append(time.perf_counter())

        await collect_replies(
            lambda: [m for m in server.messages if m.author.id == bot_id],
            lambda message: message.channel_id,
            queued,
            started,
        )
        await serve_until_stdin_closes()


# The parent process: the bot.


async def run_bot(users: int, messages: int) -> None:
    from bots.discord_adapter import DiscordAdapter
    from core.config import DatabaseSettings, DiscordSettings, Secrets, Settings
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
            adapter = DiscordAdapter(
                manager=service.manager,
                settings=DiscordSettings(
                    api_base_url=address["api"],
                    gateway_url=address["gateway"],
                    guild_ready_timeout_s=0.1,
                ),
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
