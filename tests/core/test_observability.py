"""Health and metrics endpoints of a running service, and the scheduler's job counter."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import create_async_engine

from core import observability
from core.config import PROJECT_ROOT, DatabaseSettings, GeneratorSettings, Secrets, Settings
from core.errors import ConfigError
from core.manager import IncomingMessage, ReplyKind
from core.observability import Health, Metrics, ObservabilityServer
from core.scheduler import run_locked
from core.service import Service
from core.storage import db
from tests.helpers.fakes import FakeGenerator


@dataclass
class FakeAdapter:
    platform: str
    connected: bool = True

    def is_connected(self) -> bool:
        return self.connected


@dataclass
class Running:
    service: Service
    generator: FakeGenerator
    metrics: Metrics
    adapter: FakeAdapter
    server: ObservabilityServer

    async def get(self, path: str, method: str = "GET") -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.server.url, trust_env=False) as client:
            return await client.request(method, path, timeout=10)

    async def metric(self, name: str, **labels: str) -> float | None:
        response = await self.get("/metrics")
        assert response.status_code == 200
        return sample_value(response.text, name, labels)

    async def say(self, text: str, user_id: str = "u1", platform: str = "telegram"):
        message = IncomingMessage(platform=platform, chat_id=user_id, user_id=user_id, text=text)
        return await self.service.manager.handle(message)


def sample_value(exposition: str, name: str, labels: dict[str, str]) -> float | None:
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


# A mapping, not ObservabilitySettings: a model instance would be replaced as a whole by
# the MINDHARBOR_OBSERVABILITY__* variables that tests/conftest.py sets.
FREE_PORTS = {"port": 0, "scheduler_port": 0}


@pytest.fixture
async def running(sqlite_url: str) -> AsyncIterator[Running]:
    settings = Settings(
        database=DatabaseSettings(url=sqlite_url),
        generator=GeneratorSettings(timeout_s=0.5),
        observability=FREE_PORTS,
    )
    generator = FakeGenerator()
    metrics = Metrics()
    adapter = FakeAdapter("telegram")
    async with Service(
        settings, Secrets(), generator=generator, apply_migrations=False, metrics=metrics
    ) as service:
        async with observability.serve_service(service, [adapter]) as server:
            assert server is not None
            yield Running(service, generator, metrics, adapter, server)


async def test_healthz_ok_when_every_part_is(running: Running) -> None:
    response = await running.get("/healthz")

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "status": "ok",
        "database": True,
        "generator": True,
        "adapters": {"telegram": True},
    }


async def test_healthz_503_when_adapter_disconnected(running: Running) -> None:
    running.adapter.connected = False

    response = await running.get("/healthz")

    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    assert response.json()["adapters"] == {"telegram": False}
    assert response.json()["database"] is True


async def test_healthz_503_when_generator_stopped(running: Running) -> None:
    await running.generator.stop()

    response = await running.get("/healthz")

    assert response.status_code == 503
    assert response.json()["generator"] is False
    assert response.json()["database"] is True
    assert await running.metric("mindharbor_generator_ready") == 0.0


async def test_healthz_503_when_database_unreachable(
    running: Running, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # SQLite cannot create a file in a folder that does not exist.
    broken = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'x.db'}")
    original = running.service._engine
    running.service._engine = broken
    try:
        with caplog.at_level(logging.INFO, logger="core.observability"):
            response = await running.get("/healthz")
            await running.get("/healthz")
            metrics_page = await running.get("/metrics")
            running.service._engine = original
            recovered = await running.get("/healthz")
    finally:
        running.service._engine = original
        await broken.dispose()

    # One line when the database goes away and one when it is back, not one per probe.
    unhealthy = [r for r in caplog.records if "database is unhealthy" in r.getMessage()]
    assert len(unhealthy) == 1
    assert "unable to open database file" in unhealthy[0].getMessage()
    assert "database is healthy again" in caplog.text
    assert recovered.status_code == 200
    assert response.status_code == 503
    assert response.json()["database"] is False
    assert response.json()["generator"] is True
    # Counts that cannot be read are left out instead of shown stale.
    assert metrics_page.status_code == 200
    assert "mindharbor_open_safety_cases" not in metrics_page.text


async def test_metrics_count_messages_and_latency(running: Running) -> None:
    first = await running.say("hello there")
    second = await running.say("how are you", user_id="u2")
    await running.say("from the terminal", platform="console")

    assert first.kind is ReplyKind.GENERATED
    assert second.kind is ReplyKind.GENERATED
    telegram = {"platform": "telegram"}
    assert await running.metric("mindharbor_messages_received_total", **telegram) == 2.0
    assert await running.metric("mindharbor_messages_sent_total", **telegram) == 2.0
    assert await running.metric("mindharbor_reply_latency_seconds_count", **telegram) == 2.0
    assert await running.metric("mindharbor_messages_sent_total", platform="console") == 1.0
    assert await running.metric("mindharbor_messages_sent_total", platform="discord") == 0.0
    assert await running.metric("mindharbor_generator_ready") == 1.0
    assert await running.metric("mindharbor_open_safety_cases", level="crisis") == 0.0


async def test_open_cases_gauge_counts_crisis(running: Running) -> None:
    reply = await running.say("I want to kill myself tonight")

    assert reply.case_id is not None
    assert await running.metric("mindharbor_open_safety_cases", level="crisis") == 1.0
    assert await running.metric("mindharbor_open_safety_cases", level="elevated") == 0.0


async def test_generation_errors_counted_by_kind(running: Running) -> None:
    running.generator.fail = True
    failed = await running.say("first")
    running.generator.fail = False
    running.generator.hang = True
    timed_out = await running.say("second")

    assert failed.kind is ReplyKind.APOLOGY
    assert timed_out.kind is ReplyKind.APOLOGY
    assert await running.metric("mindharbor_generation_errors_total", kind="error") == 1.0
    assert await running.metric("mindharbor_generation_errors_total", kind="timeout") == 1.0
    # The apologies are replies too.
    assert await running.metric("mindharbor_messages_sent_total", platform="telegram") == 2.0


async def test_metrics_page_is_prometheus_text(running: Running) -> None:
    response = await running.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE mindharbor_reply_latency_seconds histogram" in response.text
    assert 'mindharbor_reply_latency_seconds_bucket{le="120.0",platform="telegram"}' in (
        response.text
    )


async def test_unknown_path_and_method(running: Running) -> None:
    missing = await running.get("/")
    posted = await running.get("/healthz", method="POST")
    head = await running.get("/healthz", method="HEAD")

    assert missing.status_code == 404
    assert posted.status_code == 405
    assert posted.headers["allow"] == "GET, HEAD"
    assert head.status_code == 200
    assert head.content == b""


async def test_malformed_request_gets_400(running: Running) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", running.server.port)
    writer.write(b"nonsense\r\n\r\n")
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), timeout=5)
    writer.close()
    await writer.wait_closed()

    assert status_line.startswith(b"HTTP/1.1 400 ")


async def test_port_in_use_is_config_error(running: Running) -> None:
    async def healthy() -> Health:
        return Health(database=True)

    second = ObservabilityServer(
        "127.0.0.1", running.server.port, metrics=running.metrics, health=healthy
    )

    with pytest.raises(ConfigError, match=r"observability\.port"):
        await second.start()


async def test_scheduler_server_and_job_counter(sqlite_url: str) -> None:
    settings = Settings(database=DatabaseSettings(url=sqlite_url), observability=FREE_PORTS)
    metrics = Metrics()
    engine = db.create_engine(settings.database)
    sessions = db.create_session_factory(engine)

    async def works() -> str:
        return "exported"

    async def breaks() -> str:
        raise RuntimeError("disk full")

    try:
        done = await run_locked(sessions, "export", works, timeout_s=5, metrics=metrics)
        failed = await run_locked(sessions, "purge", breaks, timeout_s=5, metrics=metrics)
        async with observability.serve_scheduler(settings, metrics) as server:
            assert server is not None
            async with httpx.AsyncClient(base_url=server.url, trust_env=False) as client:
                health = await client.get("/healthz", timeout=10)
                page = await client.get("/metrics", timeout=10)
    finally:
        await engine.dispose()

    assert (done, failed) == ("done", "failed")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "database": True, "adapters": {}}
    jobs = "mindharbor_scheduler_jobs_total"
    assert sample_value(page.text, jobs, {"job": "export", "outcome": "done"}) == 1.0
    assert sample_value(page.text, jobs, {"job": "purge", "outcome": "failed"}) == 1.0
    # The scheduler has no generator and no conversations to report on.
    assert "mindharbor_generator_ready" not in page.text
    assert "mindharbor_open_safety_cases" not in page.text


async def test_disabled_server_starts_nothing(sqlite_url: str) -> None:
    settings = Settings(
        database=DatabaseSettings(url=sqlite_url),
        observability={"enabled": False},
    )

    async with observability.serve_scheduler(settings) as server:
        assert server is None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_run_command_serves_health_and_metrics(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MINDHARBOR_DATABASE__URL": f"sqlite+aiosqlite:///{tmp_path / 'run.db'}",
        # Started but never called: the console chat gets no message.
        "MINDHARBOR_GENERATOR__BACKEND": "openai",
        "MINDHARBOR_OBSERVABILITY__PORT": str(port),
    }
    # Without platform credentials, `run` starts the console chat on its terminal (here a
    # pseudo-terminal), which ends at end of input (Ctrl-D).
    env.pop("TELEGRAM_BOT_TOKEN", None)
    env.pop("DISCORD_BOT_TOKEN", None)
    terminal, terminal_side = os.openpty()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "core.cli",
        "run",
        cwd=PROJECT_ROOT,
        env=env,
        stdin=terminal_side,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    os.close(terminal_side)
    health = page = None
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", trust_env=False
        ) as client:
            for _ in range(600):
                try:
                    health = await client.get("/healthz", timeout=5)
                    break
                except httpx.TransportError:
                    if process.returncode is not None:
                        break  # the process ended without serving
                    await asyncio.sleep(0.2)
            if health is not None:
                page = await client.get("/metrics", timeout=5)
    finally:
        os.write(terminal, b"\x04")
        output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
        os.close(terminal)

    assert process.returncode == 0, output.decode()[-3000:]
    assert health is not None, output.decode()[-3000:]
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "database": True, "generator": True, "adapters": {}}
    assert page is not None
    assert "mindharbor_generator_ready 1.0" in page.text
