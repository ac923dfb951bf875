"""Concurrent writers on the embedded SQLite database and on PostgreSQL."""

from __future__ import annotations

import asyncio
import multiprocessing
import sys

from sqlalchemy import func, select

from core.config import DatabaseSettings
from core.storage import db, repository
from core.storage.models import Role, Turn

WRITERS = 50
TURNS_EACH = 10


async def _write(session_factory, writer: int) -> None:
    for number in range(TURNS_EACH):
        async with session_factory.begin() as session:
            user = await repository.get_or_create_user(
                session, platform="test", platform_user_id=f"writer-{writer}"
            )
            conversation = await repository.get_open_conversation(
                session, user_id=user.id, platform_chat_id="chat"
            )
            repository.add_turn(
                session, conversation=conversation, role=Role.USER, content=f"turn {number}"
            )


async def _count_turns(url: str) -> int:
    engine = db.create_engine(DatabaseSettings(url=url, pool_size=1))
    try:
        async with engine.connect() as connection:
            return (await connection.execute(select(func.count(Turn.id)))).scalar_one()
    finally:
        await engine.dispose()


async def test_fifty_concurrent_writers(database_url: str) -> None:
    engine = db.create_engine(DatabaseSettings(url=database_url, pool_size=WRITERS))
    session_factory = db.create_session_factory(engine)
    try:
        results = await asyncio.gather(
            *(_write(session_factory, writer) for writer in range(WRITERS)),
            return_exceptions=True,
        )
    finally:
        await engine.dispose()

    errors = [result for result in results if isinstance(result, BaseException)]
    assert errors == []
    assert await _count_turns(database_url) == WRITERS * TURNS_EACH


def _process_writer(url: str, first_writer: int, writers: int) -> None:
    async def main() -> None:
        engine = db.create_engine(DatabaseSettings(url=url, pool_size=writers))
        session_factory = db.create_session_factory(engine)
        try:
            await asyncio.gather(
                *(_write(session_factory, first_writer + index) for index in range(writers))
            )
        finally:
            await engine.dispose()

    asyncio.run(main())


async def test_writers_in_several_processes_share_sqlite(sqlite_url: str) -> None:
    # Processes do not share SQLAlchemy's pool, so only SQLite's own locking
    # (WAL, busy timeout, immediate transactions) keeps them from failing.
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_process_writer, args=(sqlite_url, index * 10, 10))
        for index in range(5)
    ]
    for process in processes:
        process.start()
    for process in processes:
        await asyncio.to_thread(process.join, 120)

    assert [process.exitcode for process in processes] == [0] * 5, sys.stderr
    assert await _count_turns(sqlite_url) == 50 * TURNS_EACH
