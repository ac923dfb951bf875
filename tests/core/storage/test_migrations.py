"""Alembic revisions match the models and move both databases up and down cleanly."""

from __future__ import annotations

import asyncio

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from core.config import DatabaseSettings
from core.storage import db
from core.storage.models import Base


async def _schema_diff(url: str) -> list:
    engine = db.create_engine(DatabaseSettings(url=url, pool_size=1))
    try:
        async with engine.connect() as connection:

            def compare(sync_connection):
                context = MigrationContext.configure(
                    sync_connection,
                    opts={"compare_type": True, "compare_server_default": True},
                )
                return compare_metadata(context, Base.metadata)

            return await connection.run_sync(compare)
    finally:
        await engine.dispose()


async def _table_names(url: str) -> set[str]:
    engine = db.create_engine(DatabaseSettings(url=url, pool_size=1))
    try:
        async with engine.connect() as connection:
            return set(await connection.run_sync(lambda sync: inspect(sync).get_table_names()))
    finally:
        await engine.dispose()


async def test_autogenerate_finds_no_difference(database_url: str) -> None:
    assert await _schema_diff(database_url) == []


async def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    await asyncio.to_thread(db.downgrade, database_url, "base")
    assert await _table_names(database_url) <= {"alembic_version"}

    await db.upgrade_async(database_url)
    assert {"users", "conversations", "turns"} <= await _table_names(database_url)
    assert await _schema_diff(database_url) == []


@pytest.mark.parametrize("revision", ["head"])
async def test_upgrade_is_idempotent(database_url: str, revision: str) -> None:
    await db.upgrade_async(database_url, revision)
    await db.upgrade_async(database_url, revision)
    assert await _schema_diff(database_url) == []
