"""Adapter versions: every trained LoRA adapter, and which one serves.

A version is recorded as a candidate when training ends, with its data
manifest, recipe and training figures. Promotion retires the version that
served before, in the same transaction. A partial unique index in the
database keeps at most one promoted version, even when two processes promote
at once.
The local generator follows the promoted version when
``generator.local.adapter`` is ``promoted`` (see ``follow_promoted``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.storage.models import AdapterStatus, AdapterVersion, utcnow

logger = logging.getLogger(__name__)

# The value of generator.local.adapter that follows the promoted version.
PROMOTED = "promoted"


def new_version_name(now: datetime | None = None) -> str:
    """Return a sortable version name, for example ``20261205-031200``."""
    return (now or utcnow()).strftime("%Y%m%d-%H%M%S")


async def record(
    sessions: async_sessionmaker[AsyncSession],
    *,
    version: str,
    path: Path,
    base_model: str,
    data_manifest: dict[str, Any],
    recipe: dict[str, Any],
    metrics: dict[str, Any],
) -> AdapterVersion:
    async with sessions.begin() as session:
        row = AdapterVersion(
            version=version,
            path=str(path),
            base_model=base_model,
            status=AdapterStatus.CANDIDATE,
            data_manifest=data_manifest,
            recipe=recipe,
            metrics=metrics,
            created_at=utcnow(),
        )
        session.add(row)
    logger.info("Recorded adapter version %s (%s)", version, path)
    return row


async def get(sessions: async_sessionmaker[AsyncSession], version: str) -> AdapterVersion | None:
    async with sessions() as session:
        return await session.get(AdapterVersion, version)


async def promoted(sessions: async_sessionmaker[AsyncSession]) -> AdapterVersion | None:
    async with sessions() as session:
        statement = select(AdapterVersion).where(AdapterVersion.status == AdapterStatus.PROMOTED)
        return (await session.execute(statement)).scalar_one_or_none()


async def list_versions(sessions: async_sessionmaker[AsyncSession]) -> list[AdapterVersion]:
    async with sessions() as session:
        statement = select(AdapterVersion).order_by(AdapterVersion.created_at)
        return list((await session.execute(statement)).scalars())


async def set_scores(
    sessions: async_sessionmaker[AsyncSession], version: str, scores: dict[str, Any]
) -> None:
    async with sessions.begin() as session:
        await session.execute(
            update(AdapterVersion).where(AdapterVersion.version == version).values(scores=scores)
        )


async def promote(
    sessions: async_sessionmaker[AsyncSession],
    version: str,
    *,
    decision: dict[str, Any] | None = None,
) -> AdapterVersion:
    """Make ``version`` the one that serves; the one before it is retired.

    Raises LookupError for an unknown version.
    """
    async with sessions.begin() as session:
        row = await session.get(AdapterVersion, version, with_for_update=True)
        if row is None:
            raise LookupError(
                f"No adapter version {version!r}; `mindharbor adapters list` shows them."
            )
        await session.execute(
            update(AdapterVersion)
            .where(AdapterVersion.status == AdapterStatus.PROMOTED)
            .where(AdapterVersion.version != version)
            .values(status=AdapterStatus.RETIRED)
        )
        # Flush the retirement first, so the unique index never finds two promoted rows.
        await session.flush()
        row.status = AdapterStatus.PROMOTED
        row.promoted_at = utcnow()
        if decision is not None:
            row.decision = decision
    logger.info("Promoted adapter version %s", version)
    return row


async def reject(
    sessions: async_sessionmaker[AsyncSession], version: str, *, decision: dict[str, Any]
) -> None:
    async with sessions.begin() as session:
        await session.execute(
            update(AdapterVersion)
            .where(AdapterVersion.version == version)
            .values(status=AdapterStatus.REJECTED, decision=decision)
        )
    logger.info("Rejected adapter version %s", version)


async def follow_promoted(
    sessions: async_sessionmaker[AsyncSession],
    switch: Callable[[Path, str], Awaitable[None]],
    *,
    current: str | None,
    interval_s: float,
    stop: asyncio.Event,
) -> None:
    """Call ``switch(path, version)`` whenever another version is promoted, until ``stop``.

    A failed switch is logged and tried again at the next check; the generator keeps serving
    the adapter it has.
    """
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
            return
        except TimeoutError:
            pass
        try:
            row = await promoted(sessions)
            if row is None or row.version == current:
                continue
            logger.info("Adapter version %s was promoted; switching to it", row.version)
            await switch(Path(row.path), row.version)
            current = row.version
        except Exception:
            logger.exception(
                "Failed to switch to the promoted adapter; the current one keeps serving"
            )
