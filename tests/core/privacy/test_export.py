"""Anonymised exports, tombstones and retention on real SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select, update

from core.config import DatabaseSettings
from core.manager import IncomingMessage
from core.privacy import export as export_module
from core.privacy.export import export_conversations, iter_export, purge_old_turns
from core.pseudonym import Pseudonymizer
from core.storage import db
from core.storage.models import ExportRecord, RetentionRun, Tombstone, Turn, User
from tests.helpers.fakes import FakeGenerator, manager_on

PSEUDONYMS = Pseudonymizer(b"export-test-key-0123456789abcdef")


class Harness:
    def __init__(self, url: str, out_dir: Path) -> None:
        self.engine = db.create_engine(DatabaseSettings(url=url, pool_size=5))
        self.sessions = db.create_session_factory(self.engine)
        self.out_dir = out_dir
        generator = FakeGenerator(context_length=800)
        self.generator = generator
        self.manager = manager_on(
            self.sessions, generator, system_prompts={"en": "Listen kindly."}, pseudonyms=PSEUDONYMS
        )

    async def say(self, user: str, text: str) -> None:
        await self.manager.handle(
            IncomingMessage(platform="telegram", chat_id=user, user_id=user, text=text)
        )

    async def set_training_consent(self, user: str, consent: bool) -> None:
        async with self.sessions.begin() as session:
            await session.execute(
                update(User).where(User.platform_user_id == user).values(training_consent=consent)
            )

    async def export(self, **options):
        return await export_conversations(
            self.sessions, out_dir=self.out_dir, pseudonyms=PSEUDONYMS, **options
        )


@pytest.fixture
async def harness(database_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    built = Harness(database_url, tmp_path / "exports")
    yield built
    await built.engine.dispose()


async def test_export_holds_only_consented_users_scrubbed(harness: Harness) -> None:
    await harness.say("1001", "hi, my number is 13800138000 and I feel low")
    await harness.say("1002", "I never agreed to training")
    await harness.set_training_consent("1001", True)

    result = await harness.export()

    lines = list(iter_export(result.path))
    assert result.dialogues == 1
    assert len(lines) == 1
    conversation = lines[0]["conversations"]
    assert conversation[0]["role"] == "user"
    assert "[PHONE]" in conversation[0]["content"]
    assert "13800138000" not in result.path.read_text(encoding="utf-8")
    assert lines[0]["user"] == PSEUDONYMS.pseudonym("telegram", "1001")
    assert "1001" not in lines[0]["user"]
    manifest = json.loads(result.manifest_path.read_text(encoding="utf-8"))
    assert manifest["dialogues"] == 1
    assert manifest["sha256"] == hashlib.sha256(result.path.read_bytes()).hexdigest()


async def test_forget_and_optout_leave_users_out(harness: Harness) -> None:
    for user in ("2001", "2002", "2003"):
        await harness.say(user, f"hello from {user}")
        await harness.set_training_consent(user, True)
    await harness.manager.forget(
        IncomingMessage(platform="telegram", chat_id="2001", user_id="2001", text="/forget")
    )
    await harness.set_training_consent("2002", False)
    # The forgotten user comes back and agrees again: the tombstone still keeps them out.
    await harness.say("2001", "I am back")
    await harness.set_training_consent("2001", True)

    result = await harness.export()

    users = {line["user"] for line in iter_export(result.path)}
    assert users == {PSEUDONYMS.pseudonym("telegram", "2003")}
    tombstones = (harness.out_dir / "tombstones.txt").read_text().split()
    assert tombstones == [PSEUDONYMS.pseudonym("telegram", "2001")]
    async with harness.sessions() as session:
        assert await session.scalar(select(Tombstone.pseudonym)) == tombstones[0]


async def test_next_export_starts_where_the_last_ended(harness: Harness) -> None:
    await harness.say("3001", "first week")
    await harness.set_training_consent("3001", True)
    first = await harness.export()
    second = await harness.export()
    await harness.say("3002", "second week")
    await harness.set_training_consent("3002", True)
    third = await harness.export()

    assert first.dialogues == 1
    assert second.dialogues == 0
    assert [line["user"] for line in iter_export(third.path)] == [
        PSEUDONYMS.pseudonym("telegram", "3002")
    ]
    assert third.period_start == second.period_end
    async with harness.sessions() as session:
        assert len(list((await session.execute(select(ExportRecord))).scalars())) == 3


async def test_roles_merged_and_unanswered_turn_trimmed(harness: Harness) -> None:
    harness.generator.fail = True
    await harness.say("4001", "first message, no reply")
    harness.generator.fail = False
    await harness.say("4001", "second message")
    harness.generator.fail = True
    await harness.say("4001", "a last one that was never answered")
    await harness.set_training_consent("4001", True)

    result = await harness.export()

    [line] = list(iter_export(result.path))
    assert line["conversations"] == [
        {"role": "user", "content": "first message, no reply\nsecond message"},
        # The model saw both user turns merged, as the export stores them.
        {"role": "assistant", "content": "reply to: first message, no reply\nsecond message"},
    ]


async def test_crash_mid_write_leaves_no_complete_looking_file(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    for user in ("5001", "5002"):
        await harness.say(user, "hello")
        await harness.set_training_consent(user, True)
    original = export_module._write
    calls = 0

    def crash_on_second_line(*args):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt("killed")
        return original(*args)

    monkeypatch.setattr(export_module, "_write", crash_on_second_line)
    with pytest.raises(KeyboardInterrupt):
        await harness.export()

    names = sorted(path.name for path in harness.out_dir.iterdir())
    assert all(name.endswith(".partial") for name in names)
    assert not any(name.endswith(".manifest.json") for name in names)
    async with harness.sessions() as session:
        assert await session.scalar(select(ExportRecord.id)) is None


async def test_retention_purges_old_turns_and_keeps_counts(harness: Harness) -> None:
    await harness.say("6001", "old message")
    await harness.say("6001", "new message")
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    async with harness.sessions.begin() as session:
        first_two = list(
            (await session.execute(select(Turn.id).order_by(Turn.id).limit(2))).scalars()
        )
        await session.execute(update(Turn).where(Turn.id.in_(first_two)).values(created_at=old))

    deleted = await purge_old_turns(harness.sessions, retention_days=365, batch_size=1)

    assert deleted == 2
    async with harness.sessions() as session:
        remaining = list((await session.execute(select(Turn.content))).scalars())
        run = await session.scalar(select(RetentionRun))
    assert remaining == ["new message", "reply to: new message"]
    assert run is not None
    assert run.turns_deleted == 2
