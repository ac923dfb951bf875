"""Lifecycle parts shared by every platform adapter: its state, and the handlers in flight.

The runner (``bots.runner``) drives the adapters through start, stop_intake, drain
and stop. The adapters track their handlers with ``InFlight``, so that a shutdown
can wait for them and cancel the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from core.manager import ConversationManager, IncomingMessage

_LOGGER = logging.getLogger(__name__)

# How long handlers cancelled at the end of the grace period get to unwind.
_UNWIND_TIMEOUT_S = 5.0
# How long a cancelled handler may spend telling its user, within the unwind time.
_CUT_NOTICE_TIMEOUT_S = 4.0


class AdapterState(enum.Enum):
    """Lifecycle state of a platform adapter."""

    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"


class Adapter(Protocol):
    async def start(self) -> None: ...

    async def stop_intake(self) -> None:
        """Stop receiving messages; handlers already running go on."""

    async def drain(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for running handlers; cancel the rest and return their count."""

    async def stop(self) -> None: ...


class InFlight:
    """The handler tasks that are handling messages, so that a shutdown can wait for them."""

    def __init__(self) -> None:
        self._tasks: dict[object, asyncio.Task[Any]] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        # True once the shutdown grace ran out, so a cancelled handler can tell its user why.
        self.cut = False

    def __len__(self) -> int:
        return len(self._tasks)

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count the current task as in flight until the block ends."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("InFlight.track() must be used inside an asyncio task.")
        token = object()
        self._tasks[token] = task
        self._idle.clear()
        try:
            yield
        finally:
            del self._tasks[token]
            if not self._tasks:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no handler is in flight; False when ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def cancel_all(self) -> list[asyncio.Task[Any]]:
        """Cancel every handler in flight and return their tasks."""
        tasks = list(set(self._tasks.values()))
        self.cut = True
        for task in tasks:
            task.cancel()
        return tasks

    async def finish(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for the handlers; cancel the rest and return how many."""
        if await self.wait_idle(timeout_s):
            return 0
        cancelled = self.cancel_all()
        await asyncio.wait(cancelled, timeout=_UNWIND_TIMEOUT_S)
        return len(cancelled)


async def tell_reply_cut(
    manager: ConversationManager,
    incoming: IncomingMessage,
    send: Callable[[str], Awaitable[object]],
) -> None:
    """Tell a user whose reply the shutdown cancelled that their message is saved.

    Best effort: a failure or a slow platform is logged and never delays the exit
    by more than a few seconds.
    """
    try:
        async with asyncio.timeout(_CUT_NOTICE_TIMEOUT_S):
            notice = await manager.notice(incoming, "reply_cut_by_restart")
            await send(notice.text)
    except Exception as exc:
        _LOGGER.warning(
            "Telling %s user %s that the shutdown cut their reply failed: %r",
            incoming.platform,
            incoming.user_id,
            exc,
        )
