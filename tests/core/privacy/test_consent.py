"""Consent to storage and to training, through the conversation manager on real databases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.config import DatabaseSettings
from core.manager import IncomingMessage, ReplyKind
from core.privacy.export import export_conversations, iter_export
from core.pseudonym import Pseudonymizer
from core.storage import db
from core.storage.models import SafetyCase, Turn, User
from tests.helpers.fakes import FakeGenerator, manager_on
from tests.helpers.safety import RecordingLink, build_guard

PSEUDONYMS = Pseudonymizer(b"consent-test-key-0123456789abcdef")


class Harness:
    def __init__(self, url: str) -> None:
        self.engine = db.create_engine(DatabaseSettings(url=url, pool_size=5))
        self.sessions = db.create_session_factory(self.engine)
        self.generator = FakeGenerator(context_length=800)
        self.guard = build_guard(self.sessions)
        self.link = RecordingLink()
        self.guard.desk.register_link(self.link)
        self.manager = manager_on(
            self.sessions,
            self.generator,
            system_prompts={"en": "Listen.", "zh-CN": "倾听。"},
            safety=self.guard,
            pseudonyms=PSEUDONYMS,
            require_consent=True,
            retention_days=365,
        )

    async def count(self, model) -> int:
        async with self.sessions() as session:
            return await session.scalar(select(func.count()).select_from(model))


@pytest.fixture
async def harness(database_url: str) -> AsyncIterator[Harness]:
    built = Harness(database_url)
    yield built
    await built.engine.dispose()


def message(text: str, user: str = "u1", locale: str = "en") -> IncomingMessage:
    return IncomingMessage(
        platform="telegram", chat_id=user, user_id=user, text=text, locale_hint=locale
    )


async def test_nothing_stored_before_consent(harness: Harness) -> None:
    reply = await harness.manager.handle(message("I had a long day"))

    assert reply.kind is ReplyKind.CONSENT_REQUIRED
    assert "/agree" in reply.text
    assert harness.generator.calls == []
    assert await harness.count(Turn) == 0
    assert await harness.count(User) == 0


async def test_consent_request_in_users_language(harness: Harness) -> None:
    reply = await harness.manager.handle(message("今天很累", locale="zh-hans"))

    assert "/agree" in reply.text
    assert "保存" in reply.text


async def test_agree_then_messages_are_stored(harness: Harness) -> None:
    agreed = await harness.manager.set_storage_consent(message("/agree"), True)
    reply = await harness.manager.handle(message("I had a long day"))

    assert "Thank you" in agreed.text
    assert reply.kind is ReplyKind.GENERATED
    assert await harness.count(Turn) == 2


async def test_crisis_without_consent_gets_resources_and_a_case(harness: Harness) -> None:
    reply = await harness.manager.handle(
        message("I'm going to kill myself tonight", locale="en-US")
    )

    assert "988" in reply.text
    assert "/agree" in reply.text
    assert harness.generator.calls == []
    async with harness.sessions() as session:
        turn = (await session.execute(select(Turn))).scalar_one()
    assert turn.meta == {"legal_basis": "vital_interests"}
    assert await harness.count(SafetyCase) == 1
    assert len(harness.link.posts) == 1


async def test_turns_kept_for_safety_are_never_exported(harness: Harness, tmp_path: Path) -> None:
    await harness.manager.handle(message("I'm going to kill myself tonight"))
    await harness.manager.set_storage_consent(message("/agree"), True)
    await harness.manager.set_training_consent(message("/optin"), True)
    # A fixed reply: the test double would otherwise echo the whole prompt.
    harness.generator.reply = "I'm glad you wrote. How are you feeling now?"
    await harness.manager.handle(message("thank you for listening"))

    result = await export_conversations(harness.sessions, out_dir=tmp_path, pseudonyms=PSEUDONYMS)

    exported = result.path.read_text(encoding="utf-8")
    assert "thank you for listening" in exported
    assert "kill myself" not in exported


async def test_withdrawal_stops_storage_at_once(harness: Harness) -> None:
    await harness.manager.set_storage_consent(message("/agree"), True)
    await harness.manager.handle(message("first"))
    withdrawn = await harness.manager.set_storage_consent(message("/withdraw"), False)
    reply = await harness.manager.handle(message("second"))

    assert "store nothing" in withdrawn.text
    assert reply.kind is ReplyKind.CONSENT_REQUIRED
    async with harness.sessions() as session:
        contents = list((await session.execute(select(Turn.content))).scalars())
    assert "second" not in contents


async def test_optin_after_forget_is_declined(harness: Harness) -> None:
    await harness.manager.set_storage_consent(message("/agree"), True)
    await harness.manager.handle(message("hello"))
    await harness.manager.forget(message("/forget yes"))
    await harness.manager.set_storage_consent(message("/agree"), True)

    answer = await harness.manager.set_training_consent(message("/optin"), True)
    notice = await harness.manager.privacy_notice(message("/privacy"))

    assert "out of training for good" in answer.text
    assert "Using it, anonymised, to train and evaluate the model: no" in notice.text
    async with harness.sessions() as session:
        user = (await session.execute(select(User))).scalar_one()
    assert user.training_consent is False


async def test_optin_needs_storage_consent_first(harness: Harness) -> None:
    refused = await harness.manager.set_training_consent(message("/optin"), True)
    await harness.manager.set_storage_consent(message("/agree"), True)
    accepted = await harness.manager.set_training_consent(message("/optin"), True)

    assert "/agree" in refused.text
    assert "/optout" in accepted.text
    async with harness.sessions() as session:
        user = (await session.execute(select(User))).scalar_one()
    assert user.training_consent is True
    assert user.training_consent_at is not None


async def test_optout_keeps_user_out_of_next_export(harness: Harness, tmp_path: Path) -> None:
    for user in ("a", "b"):
        await harness.manager.set_storage_consent(message("/agree", user), True)
        await harness.manager.set_training_consent(message("/optin", user), True)
        await harness.manager.handle(message(f"hello from {user}", user))
    await harness.manager.set_training_consent(message("/optout", "b"), False)

    result = await export_conversations(harness.sessions, out_dir=tmp_path, pseudonyms=PSEUDONYMS)

    assert [line["user"] for line in iter_export(result.path)] == [
        PSEUDONYMS.pseudonym("telegram", "a")
    ]


async def test_privacy_notice_shows_choices(harness: Harness) -> None:
    before = await harness.manager.privacy_notice(message("/privacy"))
    await harness.manager.set_storage_consent(message("/agree"), True)
    after = await harness.manager.privacy_notice(message("/privacy"))

    assert "Storing your conversation: no" in before.text
    assert "Storing your conversation: yes" in after.text
    assert "Using it, anonymised, to train and evaluate the model: no" in after.text
    assert "365 days" in after.text
    assert "vital interests" in after.text
