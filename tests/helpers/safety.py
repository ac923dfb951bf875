"""Helpers for safety tests: a guard built from the project's config, and a recording link."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.config import SafetySettings, Secrets, Settings
from core.pseudonym import Pseudonymizer
from core.safety.desk import Delivery
from core.safety.guard import SafetyGuard
from core.storage.models import utcnow

TEST_KEY = b"test-pseudonym-key-0123456789abcdef"


def build_guard(
    sessions: async_sessionmaker[AsyncSession],
    *,
    now: Callable[[], dt.datetime] = utcnow,
    **safety_overrides: object,
) -> SafetyGuard:
    """Build the guard from the shipped config files, with ``safety`` settings overridden."""
    settings = Settings(safety=SafetySettings(**safety_overrides))
    guard = SafetyGuard.from_settings(
        settings,
        Secrets(),
        session_factory=sessions,
        pseudonyms=Pseudonymizer(TEST_KEY),
    )
    guard.desk._now = now
    return guard


@dataclass
class RecordingLink:
    """A platform link that records moderator posts and messages to users."""

    platform: str = "console"
    posts: list[str] = field(default_factory=list)
    sent: list[tuple[str, str]] = field(default_factory=list)
    # Users who blocked the bot: sending to them reports UNREACHABLE.
    blocked: set[str] = field(default_factory=set)

    async def post_to_moderators(self, text: str) -> bool:
        self.posts.append(text)
        return True

    async def send_to_user(self, platform_user_id: str, text: str) -> Delivery:
        if platform_user_id in self.blocked:
            return Delivery.UNREACHABLE
        self.sent.append((platform_user_id, text))
        return Delivery.SENT

    def command_hint(self, case_id: int) -> str:
        return f"/ack {case_id}"
