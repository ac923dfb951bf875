"""Prometheus metrics and the health and metrics HTTP server on an internal port.

``GET /healthz`` returns 200 and a JSON object when every part is healthy
(database reachable, generator ready, platform adapters connected), else 503
with the same object. ``GET /metrics`` returns the metrics in the Prometheus
text format, or in OpenMetrics when the scraper's Accept header requests it.

The server is a small asyncio one rather than an HTTP framework: it runs on the
service's event loop, so the health check uses the service's async engine
directly, and it adds no dependency for two fixed GET routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from core.errors import ConfigError
from core.storage.models import CaseStatus, SafetyCase

if TYPE_CHECKING:
    from core.config import Settings
    from core.service import Service

_LOGGER = logging.getLogger(__name__)

PLATFORMS = ("telegram", "discord", "console")
RISK_LEVELS = ("none", "elevated", "crisis")
# Seconds; the last bucket is generator.timeout_s's default, after which the user gets an apology.
REPLY_LATENCY_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120)

# Limits on one request to the server; scrapers and probes send a few short headers.
_MAX_HEADER_LINES = 100
_REQUEST_READ_TIMEOUT_S = 5.0


class Metrics:
    """The service's metrics, in a registry of their own so that tests can make fresh ones."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.messages_received = Counter(
            "mindharbor_messages_received_total",
            "Messages handed to the conversation manager, per platform.",
            ["platform"],
            registry=self.registry,
        )
        self.messages_sent = Counter(
            "mindharbor_messages_sent_total",
            "Replies the conversation manager returned for sending, per platform.",
            ["platform"],
            registry=self.registry,
        )
        self.reply_latency = Histogram(
            "mindharbor_reply_latency_seconds",
            "Seconds from receiving a message to its reply, waits for the same user included.",
            ["platform"],
            buckets=REPLY_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.generation_errors = Counter(
            "mindharbor_generation_errors_total",
            "Generations that failed (error) or ran past generator.timeout_s (timeout).",
            ["kind"],
            registry=self.registry,
        )
        self.scheduler_jobs = Counter(
            "mindharbor_scheduler_jobs_total",
            "Scheduled job runs by outcome: done, skipped, timed out, failed.",
            ["job", "outcome"],
            registry=self.registry,
        )
        self.service_state = _ServiceStateCollector()
        self.registry.register(self.service_state)

        # Series that exist from the start, so that rate() and increase() see the first event.
        for platform in PLATFORMS:
            self.messages_received.labels(platform=platform)
            self.messages_sent.labels(platform=platform)
            self.reply_latency.labels(platform=platform)
        for kind in ("error", "timeout"):
            self.generation_errors.labels(kind=kind)

    def record_received(self, platform: str) -> None:
        self.messages_received.labels(platform=platform).inc()

    def record_reply(self, platform: str, latency_s: float) -> None:
        self.messages_sent.labels(platform=platform).inc()
        self.reply_latency.labels(platform=platform).observe(latency_s)

    def record_generation_error(self, *, timed_out: bool) -> None:
        self.generation_errors.labels(kind="timeout" if timed_out else "error").inc()

    def record_job(self, job: str, outcome: str) -> None:
        self.scheduler_jobs.labels(job=job, outcome=outcome).inc()

    def render(self, accept_header: str = "") -> tuple[bytes, str]:
        """Return the exposition body and its content type for a scraper's Accept header."""
        encoder, content_type = choose_encoder(accept_header)
        return encoder(self.registry), content_type


class _ServiceStateCollector(Collector):
    """Gauges read from the service at scrape time; a process without a service exports none."""

    def __init__(self) -> None:
        self.generator_ready: bool | None = None
        # Unresolved safety cases per level; None when the last read failed.
        self.open_cases: dict[str, int] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.generator_ready is not None:
            ready = GaugeMetricFamily(
                "mindharbor_generator_ready", "1 when the generator can serve replies, else 0."
            )
            ready.add_metric([], 1.0 if self.generator_ready else 0.0)
            yield ready
        if self.open_cases is not None:
            cases = GaugeMetricFamily(
                "mindharbor_open_safety_cases",
                "Safety cases not resolved (open or acknowledged), per risk level.",
                labels=["level"],
            )
            for level, count in sorted(self.open_cases.items()):
                cases.add_metric([level], float(count))
            yield cases


# The process's metrics. Services, the conversation manager and the scheduler use it
# unless a test passes its own.
METRICS = Metrics()


@dataclass(slots=True)
class Health:
    """The result of one health check; ``generator`` is None in a process without one."""

    database: bool
    generator: bool | None = None
    adapters: dict[str, bool] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.database and self.generator is not False and all(self.adapters.values())

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"status": "ok" if self.ok else "unavailable"}
        body["database"] = self.database
        if self.generator is not None:
            body["generator"] = self.generator
        body["adapters"] = dict(self.adapters)
        return body


class PlatformConnection(Protocol):
    """The part of a platform adapter that the health check reads."""

    platform: str

    def is_connected(self) -> bool: ...


async def database_error(engine: AsyncEngine, timeout_s: float) -> str | None:
    """Run ``SELECT 1`` within ``timeout_s`` seconds; return why it failed, or None."""
    try:
        async with asyncio.timeout(timeout_s):
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
    # Any failure (refused connection, missing file, authentication, timeout) means unhealthy.
    except Exception as exc:
        return _describe(exc)
    return None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def count_open_cases(engine: AsyncEngine, timeout_s: float) -> dict[str, int]:
    """Count safety cases not resolved, per level; levels without one count 0."""
    query = (
        select(SafetyCase.level, func.count())
        .where(SafetyCase.status != CaseStatus.RESOLVED)
        .group_by(SafetyCase.level)
    )
    async with asyncio.timeout(timeout_s):
        async with engine.connect() as connection:
            rows = (await connection.execute(query)).all()
    counts = dict.fromkeys(RISK_LEVELS, 0)
    counts.update({str(level): int(count) for level, count in rows})
    return counts


class _TransitionLog:
    """Log a health part only when it changes, so a probe every few seconds adds no lines."""

    def __init__(self) -> None:
        self._last: dict[str, bool] = {}

    def update(self, part: str, healthy: bool, error: str | None = None) -> None:
        previous = self._last.get(part)
        self._last[part] = healthy
        if previous == healthy or (previous is None and healthy):
            return
        if healthy:
            _LOGGER.info("Health check: %s is healthy again", part)
        else:
            _LOGGER.warning("Health check: %s is unhealthy (%s)", part, error or "not ready")


class ServiceProbe:
    """Health and scrape-time metric values of a running service and its platform adapters."""

    def __init__(
        self,
        service: Service,
        adapters: Iterable[PlatformConnection] = (),
        *,
        timeout_s: float = 5.0,
    ) -> None:
        self._service = service
        self._adapters = list(adapters)
        self._timeout_s = timeout_s
        self._log = _TransitionLog()

    async def health(self) -> Health:
        error = await database_error(self._service.engine, self._timeout_s)
        result = Health(
            database=error is None,
            generator=self._service.generator.is_ready,
            adapters={adapter.platform: adapter.is_connected() for adapter in self._adapters},
        )
        self._log.update("database", result.database, error)
        self._log.update("generator", bool(result.generator))
        for platform, connected in result.adapters.items():
            self._log.update(f"{platform} adapter", connected, "not connected")
        return result

    async def refresh_metrics(self) -> None:
        state = self._service.metrics.service_state
        state.generator_ready = self._service.generator.is_ready
        try:
            state.open_cases = await count_open_cases(self._service.engine, self._timeout_s)
        except Exception as exc:
            # Counts that could not be read are left out rather than shown stale.
            state.open_cases = None
            self._log.update("counting open safety cases", False, _describe(exc))
        else:
            self._log.update("counting open safety cases", True)


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    reason: str
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self, *, include_body: bool) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status} {self.reason}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + self.body if include_body else head


def _plain(status: int, reason: str, message: str, **headers: str) -> _Response:
    return _Response(status, reason, (message + "\n").encode(), headers=tuple(headers.items()))


class ObservabilityServer:
    """Serve ``GET /healthz`` and ``GET /metrics`` (HEAD too); other paths get 404.

    Each connection carries one request and is closed after the response.
    ``port`` 0 binds a free port; ``port`` returns the bound one after ``start``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        metrics: Metrics,
        health: Callable[[], Awaitable[Health]],
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._metrics = metrics
        self._health = health
        self._refresh = refresh
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self._host, self._port)
        except OSError as exc:
            raise ConfigError(
                f"Cannot listen on {self._host}:{self._port} for health and metrics: {exc}. "
                "Set observability.port (or scheduler_port) to a free port, or "
                "observability.enabled to false."
            ) from exc
        _LOGGER.info("Health and metrics at %s/healthz and %s/metrics", self.url, self.url)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        _LOGGER.info("Health and metrics server stopped")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(_REQUEST_READ_TIMEOUT_S):
                    method, target, headers = await _read_request(reader)
            except (ValueError, asyncio.IncompleteReadError):
                response, method = _plain(400, "Bad Request", "invalid HTTP request"), "GET"
            else:
                response = await self._respond(method, target, headers)
            writer.write(response.encode(include_body=method != "HEAD"))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass  # the client was too slow or disconnected, so no response can be sent
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, method: str, target: str, headers: Mapping[str, str]) -> _Response:
        path = target.split("?", 1)[0]
        if path not in ("/healthz", "/metrics"):
            return _plain(404, "Not Found", f"no such path: {path}; try /healthz or /metrics")
        if method not in ("GET", "HEAD"):
            return _plain(405, "Method Not Allowed", f"{method} is not allowed", Allow="GET, HEAD")
        try:
            if path == "/healthz":
                return await self._healthz()
            return await self._metrics_page(headers.get("accept", ""))
        except Exception:
            _LOGGER.exception("Handling %s %s failed", method, path)
            return _plain(500, "Internal Server Error", "internal error; see the service log")

    async def _healthz(self) -> _Response:
        health = await self._health()
        body = json.dumps(health.to_json()).encode() + b"\n"
        if health.ok:
            return _Response(200, "OK", body, "application/json")
        return _Response(503, "Service Unavailable", body, "application/json")

    async def _metrics_page(self, accept: str) -> _Response:
        if self._refresh is not None:
            await self._refresh()
        body, content_type = self._metrics.render(accept)
        return _Response(200, "OK", body, content_type)


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    """Read the request line and headers; raise ValueError on a malformed or oversized request."""
    request_line = (await reader.readline()).decode("latin-1").strip()
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError(f"invalid request line {request_line[:80]!r}")
    method, target, _version = parts
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADER_LINES):
        line = (await reader.readline()).decode("latin-1")
        if line in ("\r\n", "\n", ""):
            return method.upper(), target, headers
        name, separator, value = line.partition(":")
        if not separator:
            raise ValueError(f"invalid header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    raise ValueError(f"more than {_MAX_HEADER_LINES} header lines")


@contextlib.asynccontextmanager
async def serve_service(
    service: Service, adapters: Iterable[PlatformConnection] = ()
) -> AsyncIterator[ObservabilityServer | None]:
    """Run the health and metrics server of a bot process, unless observability is disabled."""
    options = service.settings.observability
    if not options.enabled:
        yield None
        return
    probe = ServiceProbe(service, adapters, timeout_s=options.health_timeout_s)
    server = ObservabilityServer(
        options.host,
        options.port,
        metrics=service.metrics,
        health=probe.health,
        refresh=probe.refresh_metrics,
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def serve_scheduler(
    settings: Settings, metrics: Metrics | None = None
) -> AsyncIterator[ObservabilityServer | None]:
    """Run the scheduler process's server: database health and the job outcome counters."""
    from core.storage import db

    options = settings.observability
    if not options.enabled:
        yield None
        return
    engine = db.create_engine(settings.database)
    log = _TransitionLog()

    async def health() -> Health:
        error = await database_error(engine, options.health_timeout_s)
        log.update("database", error is None, error)
        return Health(database=error is None)

    server = ObservabilityServer(
        options.host, options.scheduler_port, metrics=metrics or METRICS, health=health
    )
    try:
        await server.start()
        try:
            yield server
        finally:
            await server.stop()
    finally:
        await engine.dispose()
