"""Database engines for SQLite (embedded) and PostgreSQL, and Alembic migrations run from code."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from core.config import PROJECT_ROOT, DatabaseSettings

_LOGGER = logging.getLogger(__name__)

MIGRATIONS_DIR = PROJECT_ROOT / "migrations"


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def resolve_database_url(url: str) -> str:
    """Anchor a relative SQLite file path at the project root, as every configured path is."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return url
    if database.startswith("file:") or Path(database).expanduser().is_absolute():
        return url
    return parsed.set(database=str(PROJECT_ROOT / database)).render_as_string(hide_password=False)


def _ensure_sqlite_folder(url: str) -> None:
    database = make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)


def create_engine(settings: DatabaseSettings) -> AsyncEngine:
    """Create the async engine; on SQLite turn on WAL, a busy timeout and immediate transactions."""
    url = resolve_database_url(settings.url)
    if not is_sqlite(url):
        return create_async_engine(
            url,
            echo=settings.echo,
            # Statement values (message text) stay out of echo lines and error messages,
            # which are logged at INFO and above.
            hide_parameters=True,
            pool_size=settings.pool_size,
            max_overflow=settings.pool_size,
            pool_pre_ping=True,
        )

    _ensure_sqlite_folder(url)
    # NOTE: every statement costs several round trips to aiosqlite's worker
    # thread, about two dozen per message, and they bound the per-message time
    # (about 4 ms on 2 cores) and a busy bot's throughput. Running each
    # transaction in one call on a synchronous connection would remove them.
    # SQLite has one writer at a time. Connections of one process that compete
    # for the write lock wait in SQLite's busy handler, which sleeps in steps of
    # up to 100 ms. Sharing one connection makes them queue on the pool instead,
    # without sleeping. Other processes still wait on busy_timeout.
    engine = create_async_engine(
        url,
        echo=settings.echo,
        hide_parameters=True,
        pool_size=1,
        max_overflow=0,
        pool_timeout=max(30.0, settings.sqlite_busy_timeout_ms / 1000),
        connect_args={"timeout": settings.sqlite_busy_timeout_ms / 1000},
    )
    busy_timeout_ms = settings.sqlite_busy_timeout_ms

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so that "begin"
        # below decides how each transaction starts.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        # A deferred transaction that reads and then writes cannot wait for the
        # write lock: SQLite fails it at once with "database is locked". Taking
        # the write lock at BEGIN makes concurrent writers queue on busy_timeout.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker:
    # Objects stay readable after commit; the manager hands them to adapters.
    return async_sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> AlembicConfig:
    url = resolve_database_url(url)
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    # env.py leaves logging alone when it runs inside the service.
    config.attributes["configure_logger"] = False
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (blocking; call from a thread inside an event loop)."""
    if is_sqlite(url):
        _ensure_sqlite_folder(resolve_database_url(url))
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


async def upgrade_async(url: str, revision: str = "head") -> None:
    # Alembic's env.py runs its own event loop for the async engine, so it needs a thread.
    await asyncio.to_thread(upgrade, url, revision)
    _LOGGER.info("Database schema is at revision %r", revision)
