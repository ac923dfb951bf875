"""Alembic environment: runs migrations on the async engine of the configured database."""

from __future__ import annotations

import asyncio
import logging

from alembic import context
from sqlalchemy.engine import Connection

from core.config import DatabaseSettings
from core.storage.db import create_engine
from core.storage.models import Base

config = context.config
target_metadata = Base.metadata

if config.attributes.get("configure_logger", True):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or DatabaseSettings().url


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite alters tables by copying them; batch mode does that for us.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        compare_server_default=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        do_run_migrations(connection)
        return

    engine = create_engine(DatabaseSettings(url=_url(), pool_size=1))
    try:
        async with engine.connect() as async_connection:
            await async_connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
