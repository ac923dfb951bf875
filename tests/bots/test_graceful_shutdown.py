"""SIGTERM on ``mindharbor run``: replies in flight finish and are stored; a second SIGTERM exits.

The bot runs as a real process that polls the Telegram stand-in and generates
through the OpenAI stand-in, which holds every completion until the test
releases it, so the replies are in flight when the signal arrives.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from tests.bots.test_telegram_run import start_run
from tests.helpers.openai_standin import HeldReply, OpenAIStandIn
from tests.helpers.telegram_standin import TelegramStandin, TgUser

INTAKE_STOPPED = "Stopped taking new messages"


class BotProcess:
    """A ``mindharbor run`` process whose output lines are collected while it runs."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, env: dict[str, str]) -> BotProcess:
        return cls(await start_run(env))

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.lines.append(line.decode(errors="replace").rstrip())

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def wait_for_line(self, fragment: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(fragment in line for line in self.lines):
            if time.monotonic() > deadline or self._reader.done():
                raise TimeoutError(
                    f"No output line contains {fragment!r} after {timeout} s:\n"
                    + self.output[-3000:]
                )
            await asyncio.sleep(0.05)

    async def wait(self, timeout: float) -> int:
        returncode = await asyncio.wait_for(self.process.wait(), timeout)
        await self._reader
        return returncode

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        await self._reader


def bot_env(
    server: TelegramStandin, model_server: OpenAIStandIn, database: Path, *, grace_s: int = 30
) -> dict[str, str]:
    return {
        "TELEGRAM_BOT_TOKEN": server.token,
        "MINDHARBOR_TELEGRAM__API_BASE_URL": server.url,
        "MINDHARBOR_TELEGRAM__POLL_TIMEOUT_S": "1",
        "MINDHARBOR_DATABASE__URL": f"sqlite+aiosqlite:///{database}",
        "MINDHARBOR_GENERATOR__BACKEND": "openai",
        "MINDHARBOR_GENERATOR__OPENAI__BASE_URL": model_server.base_url,
        "MINDHARBOR_GENERATOR__OPENAI__MAX_RETRIES": "0",
        "MINDHARBOR_SHUTDOWN_GRACE_S": str(grace_s),
        # Port 0: a free port, so that parallel runs never compete for one.
        "MINDHARBOR_OBSERVABILITY__PORT": "0",
    }


async def send_when_started(
    server: TelegramStandin,
    model_server: OpenAIStandIn,
    users: list[TgUser],
    text_of: Callable[[TgUser], str],
) -> None:
    """Wait for the bot to start, send one message per user, and wait until each is generating."""
    await server.wait_for(
        lambda: server.commands_for(""), timeout=120, description="the bot to start"
    )
    for user in users:
        server.enqueue_private_text(text_of(user), user=user)
    await wait_for_requests(model_server, len(users), timeout=60)


async def wait_for_requests(model_server: OpenAIStandIn, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(model_server.requests) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"The model server got {len(model_server.requests)} of {count} requests "
                f"in {timeout} s."
            )
        await asyncio.sleep(0.05)


def stored_turns(database: Path, user_id: int) -> list[tuple[str, str]]:
    with sqlite3.connect(database) as connection:
        return connection.execute(
            "SELECT turns.role, turns.content FROM turns "
            "JOIN users ON users.id = turns.user_id "
            "WHERE users.platform = 'telegram' AND users.platform_user_id = ? "
            "ORDER BY turns.id",
            (str(user_id),),
        ).fetchall()


async def test_sigterm_during_twenty_replies_loses_none(tmp_path: Path) -> None:
    database = tmp_path / "shutdown.db"
    users = [TgUser(id=7000 + index, first_name=f"User{index}") for index in range(20)]
    texts = {
        user.id: f"Message {index} sent before the shutdown" for index, user in enumerate(users)
    }
    late_user = TgUser(id=7999, first_name="Late")

    with OpenAIStandIn(default=HeldReply()) as model_server:
        async with TelegramStandin() as server:
            bot = await BotProcess.start(bot_env(server, model_server, database))
            try:
                await send_when_started(server, model_server, users, lambda user: texts[user.id])

                bot.process.send_signal(signal.SIGTERM)
                await bot.wait_for_line(INTAKE_STOPPED, timeout=30)
                late_update = server.enqueue_private_text("Sent after SIGTERM", user=late_user)
                model_server.release.set()
                returncode = await bot.wait(timeout=60)
            finally:
                await bot.kill()

            assert returncode == 0, bot.output[-3000:]
            assert "Every reply in flight finished" in bot.output
            for user in users:
                assert [m.plain_text for m in server.sent_to(user.id)] == [
                    f"You said: {texts[user.id]}"
                ]
            send_calls = [call for call in server.calls if call.method.lower() == "sendmessage"]
            assert len(send_calls) == len(users)
            # Telegram keeps the update that came after the intake stopped for the next process.
            assert server.sent_to(late_user.id) == []
            pending_ids = [update["update_id"] for update in server.pending_updates]
            assert pending_ids == [late_update["update_id"]]

    assert len(model_server.requests) == len(users)
    for user in users:
        assert stored_turns(database, user.id) == [
            ("user", texts[user.id]),
            ("assistant", f"You said: {texts[user.id]}"),
        ]
    assert stored_turns(database, late_user.id) == []


async def test_grace_limit_cancels_replies(tmp_path: Path) -> None:
    database = tmp_path / "cut.db"
    users = [TgUser(id=9000 + index, first_name=f"User{index}") for index in range(2)]
    users.append(TgUser(id=9002, first_name="User2", language_code="zh-hans"))

    # The completions are never released, so every reply outlasts the one-second grace.
    with OpenAIStandIn(default=HeldReply()) as model_server:
        async with TelegramStandin() as server:
            bot = await BotProcess.start(bot_env(server, model_server, database, grace_s=1))
            try:
                await send_when_started(
                    server, model_server, users, lambda user: f"Cut message from {user.id}"
                )

                bot.process.send_signal(signal.SIGTERM)
                returncode = await bot.wait(timeout=30)
            finally:
                await bot.kill()

            # Each user gets a notice in their language instead of the reply.
            notices = {user.id: [m.plain_text for m in server.sent_to(user.id)] for user in users}
            for user in users[:2]:
                assert len(notices[user.id]) == 1
                assert "restarting" in notices[user.id][0]
                assert "Your message is saved" in notices[user.id][0]
            assert len(notices[users[2].id]) == 1
            assert "正在重启" in notices[users[2].id][0]

    assert returncode == 0, bot.output[-3000:]
    assert "cancelled 3 replies in flight" in bot.output
    for user in users:
        assert stored_turns(database, user.id) == [("user", f"Cut message from {user.id}")]


async def test_second_sigterm_exits_at_once(tmp_path: Path) -> None:
    database = tmp_path / "forced.db"
    users = [TgUser(id=8000 + index, first_name=f"User{index}") for index in range(3)]

    # The completions are never released, so the replies are still in flight at the end.
    with OpenAIStandIn(default=HeldReply()) as model_server:
        async with TelegramStandin() as server:
            bot = await BotProcess.start(bot_env(server, model_server, database))
            try:
                await send_when_started(
                    server, model_server, users, lambda user: f"Waiting message from {user.id}"
                )

                bot.process.send_signal(signal.SIGTERM)
                await bot.wait_for_line(INTAKE_STOPPED, timeout=30)
                second_signal_at = time.monotonic()
                bot.process.send_signal(signal.SIGTERM)
                returncode = await bot.wait(timeout=10)
                exit_s = time.monotonic() - second_signal_at
            finally:
                await bot.kill()

            assert server.sent == []

    assert returncode == 128 + signal.SIGTERM, bot.output[-3000:]
    assert exit_s < 5
    assert "exiting now" in bot.output
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    for user in users:
        assert stored_turns(database, user.id) == [("user", f"Waiting message from {user.id}")]
