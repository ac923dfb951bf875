"""A per-user lock in PostgreSQL that keeps each conversation's turns in order across processes.

Handling a message stores the user turn, generates a reply and stores it. In
one process, ``KeyedLocks`` runs one user's messages one after another. When
several bot processes share one PostgreSQL database, ``ConversationLocks``
also holds a transaction-level advisory lock on the user for the whole
sequence, so another process cannot store a turn of that user in between.
Commands that change the user's conversations, language or consent (and
edits and /forget) take the same lock.

The order of a user's turns is the order in which their messages reached this
lock. When two processes receive one user's messages at nearly the same
instant, neither can know the order in which the platform received them.
Telegram webhook workers behind a load balancer should therefore route each
user's updates to the same worker (by user id), and then the per-process lock
keeps the platform's order.

On SQLite no lock is taken. SQLite deployments run one bot process, where
``KeyedLocks`` is enough. SQLite's single writer orders transactions, not the
store, generate and store sequence, so two bot processes on one SQLite file
could interleave one user's turns.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator

from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from core.config import DatabaseSettings
from core.storage import db

_LOGGER = logging.getLogger(__name__)

# First key of pg_advisory_xact_lock(int, int), which keeps these locks apart
# from other advisory locks on the same database ("MH" in ASCII).
LOCK_NAMESPACE = 0x4D48
# SQLSTATE lock_not_available: lock_timeout ran out.
_LOCK_NOT_AVAILABLE = "55P03"


def user_lock_key(platform: str, platform_user_id: str) -> int:
    """Return the signed 32-bit second key of a user's advisory lock.

    Two users whose keys collide only wait for each other, and their turns stay correct.
    """
    digest = hashlib.blake2b(f"{platform}:{platform_user_id}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


class ConversationLocks:
    """Advisory locks per user on PostgreSQL, each held by a connection from a pool of its own.

    The pool is separate from the engine that stores turns. A handler holds
    its lock connection while it takes other connections to store turns, and
    with one shared pool enough concurrent handlers would hold every
    connection and wait for each other. When all ``lock_pool_size``
    connections are in use, further handlers wait for one.

    ``wait_timeout_s`` bounds the wait for a lock connection and for the lock
    itself. After it, the message is handled without the lock and a warning
    is logged: its user gets a reply, though perhaps out of order.
    """

    def __init__(self, engine: AsyncEngine | None, *, wait_timeout_s: float = 300.0) -> None:
        self._engine = engine
        self._wait_timeout_s = wait_timeout_s

    @classmethod
    def create(cls, settings: DatabaseSettings, *, wait_timeout_s: float) -> ConversationLocks:
        """Create the locks for the configured database: PostgreSQL locks, or none on SQLite."""
        url = db.resolve_database_url(settings.url)
        if db.is_sqlite(url):
            return cls(None, wait_timeout_s=wait_timeout_s)
        engine = create_async_engine(
            url,
            echo=settings.echo,
            pool_size=settings.lock_pool_size,
            max_overflow=0,
            pool_timeout=wait_timeout_s,
            pool_pre_ping=True,
            # As in db.create_engine: statement values stay out of errors and logs.
            hide_parameters=True,
        )
        return cls(engine, wait_timeout_s=wait_timeout_s)

    @property
    def enabled(self) -> bool:
        return self._engine is not None

    async def dispose(self) -> None:
        """Close the lock connections."""
        if self._engine is not None:
            await self._engine.dispose()

    @contextlib.asynccontextmanager
    async def hold(self, platform: str, platform_user_id: str) -> AsyncIterator[None]:
        """Hold the user's lock for the block; without PostgreSQL, do nothing."""
        if self._engine is None:
            yield
            return
        connection = await self._lock(self._engine, user_lock_key(platform, platform_user_id))
        try:
            yield
        finally:
            if connection is not None:
                await _release(connection)

    async def _lock(self, engine: AsyncEngine, key: int) -> AsyncConnection | None:
        """Return a connection whose open transaction holds the lock, or None after the timeout."""
        try:
            connection = await engine.connect()
        except sa_exc.TimeoutError:
            _LOGGER.warning(
                "No lock connection was free within %g s (database.lock_pool_size); "
                "handling a message without its user's lock",
                self._wait_timeout_s,
            )
            return None
        try:
            await connection.begin()
            # SET cannot take bound parameters; both values are integers.
            await connection.exec_driver_sql(
                f"SET LOCAL lock_timeout = {max(1, int(self._wait_timeout_s * 1000))}"
            )
            # The transaction stays idle while the reply is generated, and a
            # server-wide idle timeout must not end it and drop the lock.
            await connection.exec_driver_sql("SET LOCAL idle_in_transaction_session_timeout = 0")
            await connection.execute(select(func.pg_advisory_xact_lock(LOCK_NAMESPACE, key)))
        except sa_exc.DBAPIError as exc:
            await connection.close()
            if getattr(exc.orig, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
                raise
            _LOGGER.warning(
                "Another process held a user's lock for over %g s; handling the message without it",
                self._wait_timeout_s,
            )
            return None
        except BaseException:
            await connection.close()
            raise
        return connection


async def _release(connection: AsyncConnection) -> None:
    # Ending the transaction releases the lock. A failure here (the server
    # closed the connection) also ends the session, and with it the lock.
    try:
        await connection.rollback()
    except sa_exc.SQLAlchemyError as exc:
        _LOGGER.warning("Releasing a user's lock failed: %s", exc)
    finally:
        await connection.close()
