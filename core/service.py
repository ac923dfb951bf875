"""The service: one process's database, generator and conversation manager, started together."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from core import adapter_versions
from core.config import Secrets, Settings, resolve_path
from core.generation import create_generator, sampling_from_settings
from core.generation.base import Generator
from core.manager import ConversationManager
from core.observability import METRICS, Metrics
from core.prompt import prompt_builder_for
from core.pseudonym import Pseudonymizer, load_pseudonymizer
from core.safety.guard import SafetyGuard
from core.storage import db
from core.storage.conversation_lock import ConversationLocks

_LOGGER = logging.getLogger(__name__)


class ServiceState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"


class Service:
    """Owns the engine, the generator and the manager; use ``async with Service(...)``."""

    def __init__(
        self,
        settings: Settings,
        secrets: Secrets,
        *,
        generator: Generator | None = None,
        apply_migrations: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self._secrets = secrets
        self._generator = generator
        self._apply_migrations = apply_migrations
        # Counters shared by the manager and the /metrics page; tests pass a fresh Metrics.
        self.metrics = metrics or METRICS
        self._engine: AsyncEngine | None = None
        self._manager: ConversationManager | None = None
        self._safety: SafetyGuard | None = None
        self._pseudonyms: Pseudonymizer | None = None
        self._stop_reminders = asyncio.Event()
        self._reminders: asyncio.Task[None] | None = None
        self._follow_task: asyncio.Task[None] | None = None
        self._conversation_locks: ConversationLocks | None = None
        self.state = ServiceState.CREATED

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def manager(self) -> ConversationManager:
        if self._manager is None:
            raise RuntimeError("The service is not running; call start() first.")
        return self._manager

    @property
    def generator(self) -> Generator:
        if self._generator is None:
            raise RuntimeError("The service is not running; call start() first.")
        return self._generator

    @property
    def safety(self) -> SafetyGuard:
        if self._safety is None:
            raise RuntimeError("The service is not running; call start() first.")
        return self._safety

    @property
    def pseudonyms(self) -> Pseudonymizer:
        if self._pseudonyms is None:
            raise RuntimeError("The service is not running; call start() first.")
        return self._pseudonyms

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("The service is not running; call start() first.")
        return self._engine

    async def start(self) -> None:
        if self.state is ServiceState.RUNNING:
            _LOGGER.debug("Service already running")
            return
        settings = self.settings

        # Migrations are applied on start so that a new release never meets an old schema.
        if self._apply_migrations:
            await db.upgrade_async(settings.database.url)
        self._engine = db.create_engine(settings.database)
        # A process holds a user's lock for one reply (bounded by generator.timeout_s)
        # and a few writes. The wait covers one reply ahead in another process, twice over.
        self._conversation_locks = ConversationLocks.create(
            settings.database, wait_timeout_s=2 * settings.generator.timeout_s + 30
        )

        sessions = db.create_session_factory(self._engine)
        follow = (
            self._generator is None
            and settings.generator.backend == "local"
            and settings.generator.local.adapter == adapter_versions.PROMOTED
        )
        if self._generator is None:
            generator_settings = settings.generator
            promoted = await adapter_versions.promoted(sessions) if follow else None
            if follow:
                # The base model alone serves until a version is promoted.
                local = generator_settings.local.model_copy(
                    update={"adapter": promoted.path if promoted else None}
                )
                generator_settings = generator_settings.model_copy(update={"local": local})
            self._generator = create_generator(generator_settings, self._secrets)
            if promoted is not None:
                self._generator.adapter_label = promoted.version  # type: ignore[attr-defined]
        await self._generator.start()
        if follow:
            self._follow_task = asyncio.create_task(
                adapter_versions.follow_promoted(
                    sessions,
                    self._switch_adapter,
                    current=promoted.version if promoted else None,
                    interval_s=settings.generator.local.adapter_check_s,
                    stop=self._stop_reminders,
                ),
                name="follow-promoted-adapter",
            )

        sampling = sampling_from_settings(settings.generator)
        builder = prompt_builder_for(settings, self._generator, sampling.max_new_tokens)
        pseudonyms = load_pseudonymizer(
            self._secrets, resolve_path(settings.safety.pseudonym_key_file)
        )
        self._pseudonyms = pseudonyms
        self._safety = SafetyGuard.from_settings(
            settings, self._secrets, session_factory=sessions, pseudonyms=pseudonyms
        )
        if self._safety.classifier is not None:
            await self._safety.classifier.generator.start()
        self._manager = ConversationManager(
            session_factory=sessions,
            generator=self._generator,
            prompt_builder=builder,
            sampling=sampling,
            timeout_s=settings.generator.timeout_s,
            history_turns=settings.prompt.history_turns,
            default_locale=settings.chat.default_locale,
            safety=self._safety,
            break_reminder=settings.safety.break_reminder,
            pseudonyms=pseudonyms,
            require_consent=settings.privacy.require_consent,
            retention_days=settings.privacy.retention_days,
            metrics=self.metrics,
            fixed_crisis_reply=self._fixed_crisis_reply(settings.safety.crisis_reply),
            conversation_locks=self._conversation_locks,
        )
        # Posts crisis cases that stay unacknowledged to the moderators again.
        self._stop_reminders.clear()
        self._reminders = asyncio.create_task(
            self._safety.desk.run_reminders(self._stop_reminders), name="safety-reminders"
        )
        self.state = ServiceState.RUNNING
        _LOGGER.info(
            "Service started: generator %r (%s), database %s",
            self._generator.model_name,
            self._generator.name,
            self._engine.url.render_as_string(hide_password=True),
        )

    def _fixed_crisis_reply(self, choice: str) -> bool:
        if choice != "auto":
            return choice == "fixed"
        return bool(getattr(self._generator, "serves_embedded_model", False))

    async def _switch_adapter(self, path: Path, version: str) -> None:
        await self.generator.switch_adapter(path, label=version)  # type: ignore[attr-defined]

    async def stop(self) -> None:
        if self.state is not ServiceState.RUNNING:
            return
        self.state = ServiceState.STOPPED
        self._stop_reminders.set()
        if self._reminders is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reminders
        if self._follow_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow_task
            self._follow_task = None
        if self._safety is not None and self._safety.classifier is not None:
            await self._safety.classifier.generator.stop()
        if self._generator is not None:
            await self._generator.stop()
        if self._engine is not None:
            await self._engine.dispose()
        if self._conversation_locks is not None:
            await self._conversation_locks.dispose()
        _LOGGER.info("Service stopped")
