"""Jobs that the scheduler runs and that operators can run by hand with the CLI.

Each job opens its own engine on the configured database (migrating it first),
does its work and closes the engine, so it needs no running bot service.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.config import Secrets, Settings, load_secrets, load_settings, resolve_path
from core.privacy.export import ExportResult, export_conversations, purge_old_turns
from core.pseudonym import load_pseudonymizer
from core.storage import db

_LOGGER = logging.getLogger(__name__)


@asynccontextmanager
async def _database(settings: Settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    await db.upgrade_async(settings.database.url)
    engine = db.create_engine(settings.database)
    try:
        yield db.create_session_factory(engine)
    finally:
        await engine.dispose()


async def export_job(settings: Settings | None = None, secrets: Secrets | None = None) -> int:
    """Export consented conversations since the last export; return the dialogue count."""
    result = await run_export(settings or load_settings(), secrets or load_secrets())
    return result.dialogues


async def run_export(settings: Settings, secrets: Secrets) -> ExportResult:
    pseudonyms = load_pseudonymizer(secrets, resolve_path(settings.safety.pseudonym_key_file))
    async with _database(settings) as sessions:
        return await export_conversations(
            sessions, out_dir=resolve_path(settings.privacy.export_dir), pseudonyms=pseudonyms
        )


async def purge_job(settings: Settings | None = None) -> int:
    """Delete turns older than privacy.retention_days; return how many were deleted."""
    settings = settings or load_settings()
    async with _database(settings) as sessions:
        return await purge_old_turns(sessions, retention_days=settings.privacy.retention_days)


async def score_job(settings: Settings | None = None, secrets: Secrets | None = None) -> int:
    """Score a sample of recent consented conversations, rebuild the report; return the count."""
    from core.generation import create_generator
    from training.report import build_report
    from training.rubric import sample_database, score_dialogues

    settings = settings or load_settings()
    secrets = secrets or load_secrets()
    async with _database(settings) as sessions:
        dialogues = await sample_database(sessions, settings.scheduler.score_sample)
        judge = create_generator(settings.generator, secrets)
        await judge.start()
        try:
            summary = await score_dialogues(sessions, judge, dialogues)
        finally:
            await judge.stop()
        await build_report(sessions, resolve_path(settings.scheduler.report_dir))
    return summary.scored


async def retrain_job(settings: Settings | None = None, secrets: Secrets | None = None) -> bool:
    """Train, score and maybe promote a candidate adapter; return whether it was promoted."""
    from training.report import build_report
    from training.retrain import retrain

    settings = settings or load_settings()
    secrets = secrets or load_secrets()
    async with _database(settings) as sessions:
        result = await retrain(settings, secrets, sessions)
        await build_report(sessions, resolve_path(settings.scheduler.report_dir))
    return result.decision.promote
