"""The per-user database lock: two bot processes on one PostgreSQL database keep turns in order."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import subprocess
import sys
import textwrap

import pytest
from sqlalchemy import text

from core.config import PROJECT_ROOT, DatabaseSettings
from core.manager import IncomingMessage
from core.storage import db
from core.storage.conversation_lock import ConversationLocks
from tests.helpers.fakes import FakeGenerator, manager_on

USERS = 3
MESSAGES_PER_USER = 10

# One bot process: its own Service on the shared database and a generator that
# sleeps a little and echoes. Process P sends message i of each user when
# i % 2 == P, one message after another per user and all users at once.
BOT_PROCESS = textwrap.dedent(
    """
    import asyncio, sys
    from core.config import load_secrets, load_settings
    from core.manager import IncomingMessage
    from core.service import Service
    from tests.helpers.fakes import FakeGenerator, manager_on

    async def send(manager, user, process_index, messages):
        for index in range(process_index, messages, 2):
            await manager.handle(
                IncomingMessage(
                    platform="telegram",
                    chat_id=user,
                    user_id=user,
                    text=f"user {user} message {index}",
                    message_id=f"{user}-{index}",
                )
            )

    async def main(process_index, users, messages):
        generator = FakeGenerator()
        generator.delay_s = 0.05
        service = Service(
            load_settings(), load_secrets(), generator=generator, apply_migrations=False
        )
        async with service:
            print("ready", flush=True)
            # Both processes start sending when the test writes a line.
            await asyncio.to_thread(sys.stdin.readline)
            await asyncio.gather(
                *(send(service.manager, str(100 + user), process_index, messages)
                  for user in range(users))
            )
        print("done", flush=True)

    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
    """
)


def start_bot_process(url: str, process_index: int) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        "HF_HUB_OFFLINE": "1",
        "MINDHARBOR_DATABASE__URL": url,
    }
    return subprocess.Popen(
        [sys.executable, "-c", BOT_PROCESS, str(process_index), str(USERS), str(MESSAGES_PER_USER)],
        cwd=PROJECT_ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def turns_by_user(url: str) -> dict[str, list[tuple[str, str]]]:
    engine = db.create_engine(DatabaseSettings(url=url, pool_size=1))
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(
                text(
                    "SELECT users.platform_user_id, turns.role, turns.content FROM turns "
                    "JOIN users ON users.id = turns.user_id ORDER BY turns.id"
                )
            )
            turns: dict[str, list[tuple[str, str]]] = {}
            for user, role, content in rows:
                turns.setdefault(user, []).append((role, content))
            return turns
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_two_processes_keep_turn_order(postgres_url: str) -> None:
    processes = [start_bot_process(postgres_url, index) for index in range(2)]
    try:
        for process in processes:
            assert process.stdout is not None
            line = await asyncio.to_thread(process.stdout.readline)
            assert line.strip() == "ready", process.stderr.read() if process.stderr else ""
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        outputs = [
            await asyncio.to_thread(process.communicate, timeout=120) for process in processes
        ]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()

    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
        assert stdout.strip() == "done"

    turns = await turns_by_user(postgres_url)
    assert sorted(turns) == [str(100 + user) for user in range(USERS)]
    for user, user_turns in turns.items():
        roles = [role for role, _ in user_turns]
        assert roles == ["user", "assistant"] * MESSAGES_PER_USER, f"user {user}: {roles}"
        for (_, asked), (_, answered) in zip(user_turns[::2], user_turns[1::2], strict=True):
            assert answered == f"reply to: {asked}", f"user {user}"
        sent = sorted(content for role, content in user_turns if role == "user")
        expected = sorted(f"user {user} message {index}" for index in range(MESSAGES_PER_USER))
        assert sent == expected


@pytest.mark.postgres
async def test_lock_waits_for_other_holder(postgres_url: str) -> None:
    settings = DatabaseSettings(url=postgres_url, lock_pool_size=2)
    first = ConversationLocks.create(settings, wait_timeout_s=10)
    second = ConversationLocks.create(settings, wait_timeout_s=10)
    order: list[str] = []

    async def hold_first() -> None:
        async with first.hold("telegram", "42"):
            order.append("first in")
            await asyncio.sleep(0.5)
            order.append("first out")

    async def hold_second() -> None:
        await asyncio.sleep(0.1)
        async with second.hold("telegram", "42"):
            order.append("second in")

    try:
        await asyncio.gather(hold_first(), hold_second())
    finally:
        await first.dispose()
        await second.dispose()

    assert order == ["first in", "first out", "second in"]


@pytest.mark.postgres
async def test_lock_timeout_proceeds_unlocked(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = DatabaseSettings(url=postgres_url, lock_pool_size=1)
    holder = ConversationLocks.create(settings, wait_timeout_s=10)
    waiter = ConversationLocks.create(settings, wait_timeout_s=0.3)
    entered = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with holder.hold("telegram", "7"):
            entered.set()
            await release.wait()

    holding = asyncio.create_task(hold())
    try:
        await entered.wait()
        with caplog.at_level(logging.WARNING, logger="core.storage.conversation_lock"):
            async with asyncio.timeout(5), waiter.hold("telegram", "7"):
                pass
        # Another user's lock is free at once, and the one connection went back to the pool.
        async with asyncio.timeout(5), waiter.hold("telegram", "8"):
            pass
    finally:
        release.set()
        await holding
        await holder.dispose()
        await waiter.dispose()

    assert "held a user's lock for over 0.3 s" in caplog.text


def test_sqlite_takes_no_lock(sqlite_url: str) -> None:
    locks = ConversationLocks.create(DatabaseSettings(url=sqlite_url), wait_timeout_s=1)
    assert not locks.enabled


# Every call that changes a user's turns, conversations or settings, by name.
USER_CHANGES = {
    "reset": lambda manager, message: manager.reset(message),
    "set_locale": lambda manager, message: manager.set_locale(message, "zh"),
    "handle_edit": lambda manager, message: manager.handle_edit(
        dataclasses.replace(message, text="edited", revision=1)
    ),
    "storage_consent": lambda manager, message: manager.set_storage_consent(message, False),
    "training_consent": lambda manager, message: manager.set_training_consent(message, True),
    "forget": lambda manager, message: manager.forget(message),
}


@pytest.mark.postgres
@pytest.mark.parametrize("change", sorted(USER_CHANGES))
async def test_user_change_waits_for_lock(postgres_url: str, change: str) -> None:
    settings = DatabaseSettings(url=postgres_url, lock_pool_size=2)
    engine = db.create_engine(settings)
    holder = ConversationLocks.create(settings, wait_timeout_s=10)
    manager_locks = ConversationLocks.create(settings, wait_timeout_s=10)
    manager = manager_on(
        db.create_session_factory(engine), FakeGenerator(), conversation_locks=manager_locks
    )
    message = IncomingMessage(
        platform="telegram", chat_id="5", user_id="5", text="hello", message_id="m1"
    )
    entered = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        # Another bot process in the middle of handling this user's message.
        async with holder.hold("telegram", "5"):
            entered.set()
            await release.wait()

    try:
        await manager.handle(message)
        holding = asyncio.create_task(hold())
        await entered.wait()
        changing = asyncio.create_task(USER_CHANGES[change](manager, message))
        await asyncio.sleep(0.3)
        waited = not changing.done()
        release.set()
        await holding
        async with asyncio.timeout(10):
            await changing
    finally:
        release.set()
        await holder.dispose()
        await manager_locks.dispose()
        await engine.dispose()

    assert waited
    assert changing.exception() is None
