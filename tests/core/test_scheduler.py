"""The scheduler: leases in the database, timeouts, and one run after a missed run time."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import select

from core.config import DatabaseSettings, SchedulerSettings, Settings
from core.scheduler import (
    acquire_lock,
    build_scheduler,
    crontab_trigger,
    remove_disabled_jobs,
    run_locked,
    sync_database_url,
)
from core.storage import db
from core.storage.models import JobLock


async def record_run(path: str) -> None:
    """A job for the job store: appends one line per run to ``path``."""
    with open(path, "a", encoding="utf-8") as file:
        file.write("run\n")


def test_sync_urls_for_the_job_store() -> None:
    assert sync_database_url("sqlite+aiosqlite:///var/x.db") == "sqlite:///var/x.db"
    assert sync_database_url("postgresql+asyncpg://u@h/db") == "postgresql+psycopg://u@h/db"


async def test_two_processes_run_a_job_once(database_url: str) -> None:
    # Two engines stand for two scheduler processes on one database.
    engines = [db.create_engine(DatabaseSettings(url=database_url)) for _ in range(2)]
    runs = 0

    async def slow_job() -> None:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.3)

    try:
        outcomes = await asyncio.gather(
            *(
                run_locked(
                    db.create_session_factory(engine),
                    "export",
                    slow_job,
                    timeout_s=5,
                    holder=f"process-{index}",
                )
                for index, engine in enumerate(engines)
            )
        )
    finally:
        for engine in engines:
            await engine.dispose()

    assert sorted(outcomes) == ["done", "skipped"]
    assert runs == 1


async def test_hanging_job_is_stopped_by_timeout(database_url: str) -> None:
    engine = db.create_engine(DatabaseSettings(url=database_url))
    sessions = db.create_session_factory(engine)
    try:
        outcome = await run_locked(
            sessions, "purge", lambda: asyncio.Event().wait(), timeout_s=0.2, holder="a"
        )
        # The lease was released, so the next run can start at once.
        again = await acquire_lock(sessions, "purge", "b", 10)
    finally:
        await engine.dispose()

    assert outcome == "timed out"
    assert again


async def test_stale_lease_is_taken_over(database_url: str) -> None:
    engine = db.create_engine(DatabaseSettings(url=database_url))
    sessions = db.create_session_factory(engine)
    try:
        assert await acquire_lock(sessions, "export", "crashed", 0.1)
        assert not await acquire_lock(sessions, "export", "other", 10)
        await asyncio.sleep(0.2)
        assert await acquire_lock(sessions, "export", "other", 10)
        async with sessions() as session:
            holder = await session.scalar(select(JobLock.holder))
    finally:
        await engine.dispose()

    assert holder == "other"


async def test_failing_job_is_reported_not_raised(database_url: str) -> None:
    engine = db.create_engine(DatabaseSettings(url=database_url))

    async def broken() -> None:
        raise ValueError("disk full")

    try:
        outcome = await run_locked(db.create_session_factory(engine), "export", broken, timeout_s=5)
    finally:
        await engine.dispose()

    assert outcome == "failed"


@pytest.mark.parametrize("missed_runs", [1, 3])
async def test_restart_after_missed_runs_runs_once(
    sqlite_url: str, tmp_path: Path, missed_runs: int
) -> None:
    store_url = sync_database_url(sqlite_url)
    marker = tmp_path / "runs.txt"
    before = AsyncIOScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=store_url)},
        job_defaults={"coalesce": True, "misfire_grace_time": 6 * 3600},
        timezone=dt.UTC,
    )
    # The first scheduler registers an hourly job and stops before its run times.
    before.add_job(
        "tests.core.test_scheduler:record_run",
        IntervalTrigger(hours=1, timezone=dt.UTC),
        args=[str(marker)],
        id="export",
        next_run_time=dt.datetime.now(dt.UTC) - dt.timedelta(hours=missed_runs, minutes=1),
    )
    before.start(paused=True)
    before.shutdown(wait=False)

    after = AsyncIOScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=store_url)},
        job_defaults={"coalesce": True, "misfire_grace_time": 6 * 3600},
        timezone=dt.UTC,
    )
    after.start()
    try:
        for _ in range(50):
            if marker.exists():
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
    finally:
        after.shutdown(wait=False)

    assert marker.read_text().splitlines() == ["run"]


async def test_scheduler_registers_jobs_from_settings(sqlite_url: str) -> None:
    settings = Settings(
        database=DatabaseSettings(url=sqlite_url),
        scheduler=SchedulerSettings(
            timezone="Asia/Shanghai", export_cron="0 4 * * 1", purge_cron="", score_cron=""
        ),
    )
    await db.upgrade_async(sqlite_url)

    scheduler = build_scheduler(settings)
    scheduler.start(paused=True)
    try:
        jobs = {job.id: job for job in scheduler.get_jobs()}
    finally:
        scheduler.shutdown(wait=False)

    assert set(jobs) == {"export"}
    assert jobs["export"].args == ("export",)
    assert str(jobs["export"].trigger.timezone) == "Asia/Shanghai"
    assert jobs["export"].next_run_time.hour == 4


@pytest.mark.parametrize(
    ("expression", "weekday"),
    [("0 3 * * 1", 0), ("0 3 * * 0", 6), ("0 3 * * 7", 6), ("0 3 * * 5", 4)],
)
def test_crontab_weekdays_count_from_sunday(expression: str, weekday: int) -> None:
    trigger = crontab_trigger(expression, "UTC")
    start = dt.datetime(2026, 12, 4, tzinfo=dt.UTC)  # a Friday

    fire = trigger.get_next_fire_time(None, start)

    assert fire.weekday() == weekday
    assert fire.hour == 3


def test_invalid_crontab_is_rejected() -> None:
    with pytest.raises(ValueError, match="expected 5 fields"):
        crontab_trigger("0 3 * *", "UTC")


async def test_empty_cron_removes_a_stored_job(sqlite_url: str) -> None:
    await db.upgrade_async(sqlite_url)
    enabled = Settings(database=DatabaseSettings(url=sqlite_url))
    first = build_scheduler(enabled)
    first.start(paused=True)
    assert {job.id for job in first.get_jobs()} == {"export", "purge", "score"}
    first.shutdown(wait=False)

    disabled = Settings(
        database=DatabaseSettings(url=sqlite_url), scheduler=SchedulerSettings(purge_cron="")
    )
    second = build_scheduler(disabled)
    second.start(paused=True)
    try:
        remove_disabled_jobs(second, disabled)
        remaining = {job.id for job in second.get_jobs()}
    finally:
        second.shutdown(wait=False)

    assert remaining == {"export", "score"}
