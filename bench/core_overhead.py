"""Benchmark: time per message through the ConversationManager, with an instant generator.

Prints p50 and p99 per message on SQLite and PostgreSQL for a user with 10 and
with 10,000 stored turns, and the ratio to a bare insert plus select of one
row on the same database. Targets: p50 under 3 ms on SQLite, and the
10,000-turn case within 1.3x of the 10-turn case.

    python bench/core_overhead.py [--messages 400] [--postgres-url URL | --no-postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
from sqlalchemy import insert, select, text
from sqlalchemy.engine import make_url

from core.config import BreakReminderSettings, DatabaseSettings
from core.generation.base import SamplingParams
from core.manager import ConversationManager, IncomingMessage
from core.prompt import PromptBuilder
from core.storage import db, repository
from core.storage.conversation_lock import ConversationLocks
from core.storage.models import Role, Turn, utcnow
from tests.helpers.fakes import FakeGenerator
from tests.helpers.safety import build_guard

DEFAULT_POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def seed_history(sessions, user_id: str, turns: int) -> None:
    async with sessions.begin() as session:
        user = await repository.get_or_create_user(
            session, platform="bench", platform_user_id=user_id
        )
        conversation = await repository.get_open_conversation(
            session, user_id=user.id, platform_chat_id="chat"
        )
        rows = [
            {
                "conversation_id": conversation.id,
                "user_id": user.id,
                "role": Role.USER if index % 2 == 0 else Role.ASSISTANT,
                "content": f"stored turn {index} with a sentence of ordinary length in it",
                "platform_chat_id": "chat",
                "revision": 0,
                "created_at": utcnow(),
            }
            for index in range(turns)
        ]
        await session.execute(insert(Turn), rows)
    # A production database has statistics from autovacuum; give the planner them too.
    if sessions.kw["bind"].dialect.name == "postgresql":
        async with sessions.begin() as session:
            await session.execute(text("ANALYZE turns"))


async def time_manager(manager: ConversationManager, user_id: str, messages: int) -> list[float]:
    timings = []
    for index in range(messages):
        message = IncomingMessage(
            platform="bench",
            chat_id="chat",
            user_id=user_id,
            text=f"message {index}: I have been feeling low this week",
            message_id=f"m{index}",
        )
        started = time.perf_counter()
        await manager.handle(message)
        timings.append(time.perf_counter() - started)
    return timings


async def time_bare_row(sessions, messages: int) -> list[float]:
    async with sessions.begin() as session:
        user = await repository.get_or_create_user(
            session, platform="bench", platform_user_id="bare"
        )
        conversation = await repository.get_open_conversation(
            session, user_id=user.id, platform_chat_id="chat"
        )
    timings = []
    for index in range(messages):
        started = time.perf_counter()
        async with sessions.begin() as session:
            turn = repository.add_turn(
                session, conversation=conversation, role=Role.USER, content=f"row {index}"
            )
            await session.flush()
            await session.execute(select(Turn.content).where(Turn.id == turn.id))
        timings.append(time.perf_counter() - started)
    return timings


async def run_database(label: str, url: str, messages: int) -> None:
    await db.upgrade_async(url)
    settings = DatabaseSettings(url=url, pool_size=5)
    engine = db.create_engine(settings)
    sessions = db.create_session_factory(engine)
    generator = FakeGenerator(context_length=8192)
    # As the service runs it: a per-user advisory lock on PostgreSQL, none on SQLite.
    locks = ConversationLocks.create(settings, wait_timeout_s=90)
    manager = ConversationManager(
        session_factory=sessions,
        generator=generator,
        prompt_builder=PromptBuilder(
            system_prompts={"en": "You are a kind listener."},
            count_tokens=generator.count_prompt_tokens,
            context_length=generator.context_length,
            max_new_tokens=256,
        ),
        sampling=SamplingParams(),
        timeout_s=30,
        # The full path: risk screening of every turn, reply screening, break reminders.
        safety=build_guard(sessions),
        break_reminder=BreakReminderSettings(),
        conversation_locks=locks,
    )

    try:
        results = {}
        for stored in (10, 10_000):
            user_id = f"user-{stored}"
            await seed_history(sessions, user_id, stored)
            await time_manager(manager, user_id, 20)  # warm-up
            results[stored] = await time_manager(manager, user_id, messages)
        bare = await time_bare_row(sessions, messages)
    finally:
        await locks.dispose()
        await engine.dispose()

    bare_p50 = statistics.median(bare) * 1000
    print(
        f"\n{label}: bare insert + select of one row: p50 {bare_p50:.2f} ms, "
        f"p99 {percentile(bare, 0.99) * 1000:.2f} ms"
    )
    for stored, timings in results.items():
        p50 = statistics.median(timings) * 1000
        p99 = percentile(timings, 0.99) * 1000
        print(
            f"{label}: {stored:>6} stored turns: p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
            f"p50 / bare p50 = {p50 / bare_p50:.1f}x"
        )
    ratio = statistics.median(results[10_000]) / statistics.median(results[10])
    print(f"{label}: p50 with 10,000 turns / p50 with 10 turns = {ratio:.2f}x (target <= 1.3x)")


async def create_postgres_database(url: str) -> tuple[str, str]:
    name = f"mh_bench_{uuid.uuid4().hex[:8]}"
    admin = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(admin)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return admin, name


async def drop_postgres_database(admin: str, name: str) -> None:
    connection = await asyncpg.connect(admin)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=400, help="timed messages per case")
    parser.add_argument(
        "--postgres-url", default=os.environ.get("MINDHARBOR_TEST_POSTGRES_URL", DEFAULT_POSTGRES)
    )
    parser.add_argument("--no-postgres", action="store_true", help="measure SQLite only")
    args = parser.parse_args()

    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )
    with tempfile.TemporaryDirectory() as folder:
        await run_database(
            "SQLite", f"sqlite+aiosqlite:///{Path(folder) / 'bench.db'}", args.messages
        )

    if not args.no_postgres:
        admin, name = await create_postgres_database(args.postgres_url)
        try:
            url = (
                make_url(args.postgres_url).set(database=name).render_as_string(hide_password=False)
            )
            await run_database("PostgreSQL", url, args.messages)
        finally:
            await drop_postgres_database(admin, name)


if __name__ == "__main__":
    asyncio.run(main())
