"""The scheduler process: APScheduler 3 with its job store in the service's database.

Jobs are registered by importable reference (``core.scheduler:run_named_job``)
with the job's name as the only argument, so the job store holds no pickled
objects of ours. Cron times come from settings in an explicit time zone.
Coalescing and a misfire grace time make a restart around a run time run a
missed job once, not never and not twice. Each run takes a lease in the
``job_locks`` table first, so two scheduler processes never run one job at
the same time, and runs under a timeout; an outcome is logged and a failure
never stops the scheduler.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import re
import socket
import uuid
from collections.abc import Awaitable, Callable

from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.config import Settings, load_settings
from core.observability import METRICS, Metrics
from core.storage import db
from core.storage.models import JobLock, utcnow

_LOGGER = logging.getLogger(__name__)

JOB_STORE_TABLE = "apscheduler_jobs"
# Unique per process, recorded as the holder of the leases it takes.
HOLDER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _export() -> Awaitable[object]:
    from core.jobs import export_job

    return export_job()


def _purge() -> Awaitable[object]:
    from core.jobs import purge_job

    return purge_job()


def _score() -> Awaitable[object]:
    from core.jobs import score_job

    return score_job()


def _retrain() -> Awaitable[object]:
    from core.jobs import retrain_job

    return retrain_job()


# Job names and what they run; each is also a CLI command (`mindharbor export`,
# `purge`, `score --database N` followed by `report`, and `retrain`).
JOBS: dict[str, Callable[[], Awaitable[object]]] = {
    "export": _export,
    "purge": _purge,
    "score": _score,
    "retrain": _retrain,
}


def sync_database_url(url: str) -> str:
    """Return the synchronous driver's URL for the job store (APScheduler 3 is synchronous)."""
    if url.startswith("sqlite+aiosqlite://"):
        return "sqlite://" + url.removeprefix("sqlite+aiosqlite://")
    if url.startswith("postgresql+asyncpg://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql+asyncpg://")
    return url


async def acquire_lock(
    sessions: async_sessionmaker[AsyncSession], name: str, holder: str, lease_s: float
) -> bool:
    """Take the lease on ``name`` for ``lease_s`` seconds; False when another holder has it."""
    now = utcnow()
    until = now + dt.timedelta(seconds=lease_s)
    try:
        async with sessions.begin() as session:
            session.add(JobLock(name=name, holder=holder, locked_until=until))
        return True
    except IntegrityError:
        pass
    # The row exists: take it over only when its lease has run out.
    async with sessions.begin() as session:
        result = await session.execute(
            update(JobLock)
            .where(JobLock.name == name, JobLock.locked_until < now)
            .values(holder=holder, locked_until=until)
        )
        return bool(result.rowcount)


async def release_lock(sessions: async_sessionmaker[AsyncSession], name: str, holder: str) -> None:
    async with sessions.begin() as session:
        await session.execute(delete(JobLock).where(JobLock.name == name, JobLock.holder == holder))


async def run_locked(
    sessions: async_sessionmaker[AsyncSession],
    name: str,
    job: Callable[[], Awaitable[object]],
    *,
    timeout_s: float,
    holder: str = HOLDER,
    metrics: Metrics | None = None,
) -> str:
    """Run ``job`` under the lease ``name`` with a timeout; return the outcome, also logged.

    Outcomes: "done", "skipped" (another process holds the lease), "timed out", "failed".
    Each is counted in mindharbor_scheduler_jobs_total of ``metrics`` (default: the process's).
    """
    metrics = metrics or METRICS
    # The lease outlives the timeout a little, so a stuck holder's lease ends on its own.
    if not await acquire_lock(sessions, name, holder, timeout_s + 60):
        _LOGGER.info("Job %s skipped: another scheduler is running it", name)
        metrics.record_job(name, "skipped")
        return "skipped"
    started = asyncio.get_running_loop().time()
    try:
        result = await asyncio.wait_for(job(), timeout=timeout_s)
    except TimeoutError:
        _LOGGER.error("Job %s timed out after %.0f s and was cancelled", name, timeout_s)
        metrics.record_job(name, "timed out")
        return "timed out"
    except Exception:
        _LOGGER.exception("Job %s failed", name)
        metrics.record_job(name, "failed")
        return "failed"
    finally:
        await release_lock(sessions, name, holder)
    _LOGGER.info(
        "Job %s done in %.1f s: %s", name, asyncio.get_running_loop().time() - started, result
    )
    metrics.record_job(name, "done")
    return "done"


async def run_named_job(name: str) -> str:
    """Run the registered job ``name`` with its lease and timeout (what the job store calls)."""
    settings = load_settings()
    engine = db.create_engine(settings.database)
    try:
        return await run_locked(
            db.create_session_factory(engine),
            name,
            JOBS[name],
            timeout_s=(
                settings.scheduler.retrain_timeout_s
                if name == "retrain"
                else settings.scheduler.job_timeout_s
            ),
        )
    finally:
        await engine.dispose()


_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


def crontab_trigger(expression: str, timezone: str) -> CronTrigger:
    """Build a trigger from a standard crontab line, where day of week 0 and 7 are Sunday.

    APScheduler 3's own ``CronTrigger.from_crontab`` numbers weekdays from
    Monday = 0, so "0 3 * * 1" would run on Tuesdays; weekday numbers are
    turned into names here instead.
    """
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(
            f"Invalid crontab line {expression!r}: expected 5 fields "
            "(minute hour day month weekday), for example '0 3 * * 1'."
        )
    minute, hour, day, month, weekday = fields
    weekday = re.sub(r"\d+", lambda match: _WEEKDAYS[int(match.group()) % 8], weekday)
    return CronTrigger(
        minute=minute, hour=hour, day=day, month=month, day_of_week=weekday, timezone=timezone
    )


def _crons(settings: Settings) -> dict[str, str]:
    options = settings.scheduler
    return {
        "export": options.export_cron,
        "purge": options.purge_cron,
        "score": options.score_cron,
        "retrain": options.retrain_cron,
    }


def remove_disabled_jobs(scheduler: AsyncIOScheduler, settings: Settings) -> None:
    """Remove stored jobs whose cron setting is now empty (a started scheduler only)."""
    for name, cron in _crons(settings).items():
        if not cron and scheduler.get_job(name) is not None:
            scheduler.remove_job(name)
            _LOGGER.info("Job %s is turned off (empty cron) and was removed", name)


def build_scheduler(settings: Settings) -> AsyncIOScheduler:
    """Create the scheduler with the persistent job store and register (or update) the jobs."""
    options = settings.scheduler
    scheduler = AsyncIOScheduler(
        jobstores={
            "default": SQLAlchemyJobStore(
                url=sync_database_url(settings.database.url), tablename=JOB_STORE_TABLE
            )
        },
        job_defaults={
            "coalesce": True,
            "misfire_grace_time": options.misfire_grace_s,
            "max_instances": 1,
        },
        timezone=options.timezone,
    )
    for name, cron in _crons(settings).items():
        if not cron:
            continue
        scheduler.add_job(
            "core.scheduler:run_named_job",
            crontab_trigger(cron, options.timezone),
            args=[name],
            id=name,
            name=name,
            replace_existing=True,
        )
    return scheduler


async def run_scheduler(settings: Settings, stop: asyncio.Event) -> None:
    """Run the scheduler until ``stop`` is set."""
    await db.upgrade_async(settings.database.url)
    scheduler = build_scheduler(settings)
    scheduler.start()
    remove_disabled_jobs(scheduler, settings)
    for job in scheduler.get_jobs():
        _LOGGER.info("Scheduled %s, next run %s", job.id, job.next_run_time)
    try:
        await stop.wait()
    finally:
        scheduler.shutdown(wait=False)
        _LOGGER.info("Scheduler stopped")
