"""Shared fixtures: migrated SQLite and PostgreSQL databases, fresh for each test."""

from __future__ import annotations

import os

# Set before transformers is imported anywhere: tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests of other features talk to the bot without the consent step; the
# consent tests remove this variable to get the shipped default (on).
os.environ.setdefault("MINDHARBOR_PRIVACY__REQUIRE_CONSENT", "false")
# Services started in tests use this key instead of creating one under var/.
os.environ.setdefault("MINDHARBOR_PSEUDONYM_KEY", "test-pseudonym-key-not-for-production")
# `mindharbor run` and `scheduler` started by tests listen for health and metrics on free
# ports, so that test runs on one machine do not compete for the default ones.
os.environ.setdefault("MINDHARBOR_OBSERVABILITY__PORT", "0")
os.environ.setdefault("MINDHARBOR_OBSERVABILITY__SCHEDULER_PORT", "0")

import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from core.config import DatabaseSettings
from core.storage import db

POSTGRES_URL = os.environ.get(
    "MINDHARBOR_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)


def _plain_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _postgres_admin(statement: str) -> None:
    connection = await asyncpg.connect(_plain_dsn(POSTGRES_URL))
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to head once; each test gets a copy."""
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    db.upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(scope="session")
async def postgres_template() -> AsyncIterator[str]:
    """A PostgreSQL database migrated to head once; each test gets a copy made from it."""
    if not POSTGRES_URL:
        pytest.skip("MINDHARBOR_TEST_POSTGRES_URL is empty")
    name = f"mh_template_{uuid.uuid4().hex[:10]}"
    await _postgres_admin(f'CREATE DATABASE "{name}"')
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    await db.upgrade_async(url)
    yield name
    await _postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    path = tmp_path / "mindharbor.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
async def postgres_url(postgres_template: str) -> AsyncIterator[str]:
    name = f"mh_test_{uuid.uuid4().hex[:10]}"
    await _postgres_admin(f'CREATE DATABASE "{name}" TEMPLATE "{postgres_template}"')
    yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    await _postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A migrated database of each kind, fresh for every test."""
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    yield request.getfixturevalue(fixture)


@pytest.fixture
def database_settings(database_url: str) -> DatabaseSettings:
    return DatabaseSettings(url=database_url, pool_size=5)
