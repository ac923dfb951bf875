"""The console adapter: interactive chat and replay of recorded dialogues."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bots import console
from core.config import DatabaseSettings, Secrets, Settings
from core.service import Service
from tests.helpers.fakes import FakeGenerator


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(database=DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"))


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[Service]:
    async with Service(settings, Secrets(), generator=FakeGenerator()) as running:
        yield running


async def chat(service: Service, lines: str) -> str:
    output = io.StringIO()
    await console.run_interactive(service, user_id="alice", stdin=io.StringIO(lines), stdout=output)
    return output.getvalue()


async def test_interactive_chat_answers_and_runs_commands(service: Service) -> None:
    output = await chat(service, "hello there\n/lang zh\n/help\n/bogus\n/reset\n")

    assert "MindHarbor console chat" in output
    assert "MindHarbor: reply to: hello there" in output
    assert "接下来我会用中文回复你。" in output
    assert "/reset - 开始新的对话" in output
    assert "我不认识命令 /bogus" in output
    assert "我们重新开始了一段对话" in output


async def test_history_persists_across_runs(settings: Settings) -> None:
    async with Service(settings, Secrets(), generator=FakeGenerator()) as first:
        await chat(first, "my name is Sam\n")

    generator = FakeGenerator()
    async with Service(settings, Secrets(), generator=generator) as second:
        output = await chat(second, "do you remember me?\n")

    assert "MindHarbor: reply to: do you remember me?" in output
    contents = [message.content for message in generator.calls[-1]]
    assert contents[1:] == ["my name is Sam", "reply to: my name is Sam", "do you remember me?"]


def write_dialogues(path: Path) -> None:
    lines = [
        # Opens with the supporter and holds two user messages in a row, as ESConv does.
        {
            "id": "d1",
            "conversations": [
                {"role": "assistant", "content": "Hi, how can I help?"},
                {"role": "user", "content": "I can't sleep."},
                {"role": "user", "content": "Work is too much."},
                {"role": "assistant", "content": "That sounds exhausting."},
                {"role": "user", "content": "It is."},
            ],
        },
        {"id": "d2", "conversations": [{"role": "user", "content": "我最近很焦虑。"}]},
    ]
    text = "\n".join(json.dumps(line, ensure_ascii=False) for line in lines)
    path.write_text(text + "\n{not json\n", encoding="utf-8")


async def test_replay_answers_every_user_turn(service: Service, tmp_path: Path) -> None:
    path = tmp_path / "dialogues.jsonl"
    write_dialogues(path)
    output = io.StringIO()

    report = await console.replay(service, path, stdout=output, concurrency=2)

    assert report.dialogues == 2
    assert report.user_turns == 4
    assert report.replies == 4
    assert report.stored_turns == 8
    assert report.skipped_lines == [
        "line 3: not a dialogue in the training format (JSONDecodeError)"
    ]
    text = output.getvalue()
    assert "[d1 #2] user: Work is too much." in text
    assert "[d2 #1] MindHarbor (" in text
    assert "Replayed 2 dialogues: 4 user turns, 4 replies" in text


async def test_replay_limit(service: Service, tmp_path: Path) -> None:
    path = tmp_path / "dialogues.jsonl"
    write_dialogues(path)

    report = await console.replay(service, path, limit=1, stdout=io.StringIO())

    assert report.dialogues == 1
    assert report.user_turns == 3


async def test_replay_with_consent_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MINDHARBOR_PRIVACY__REQUIRE_CONSENT", raising=False)
    settings = Settings(database=DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'r.db'}"))
    path = tmp_path / "dialogues.jsonl"
    write_dialogues(path)

    async with Service(settings, Secrets(), generator=FakeGenerator()) as service:
        assert service.settings.privacy.require_consent
        report = await console.replay(service, path, stdout=io.StringIO())

    assert report.replies == 4
    assert report.stored_turns == 8


async def test_console_consent_and_forget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MINDHARBOR_PRIVACY__REQUIRE_CONSENT", raising=False)
    settings = Settings(database=DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"))
    async with Service(settings, Secrets(), generator=FakeGenerator()) as service:
        output = await chat(service, "hello\n/agree\nhello again\n/forget\n/forget yes\n/privacy\n")

    assert "Send /agree if that is all right" in output
    assert "MindHarbor: reply to: hello again" in output
    assert "reply to: hello\n" not in output
    assert "Send /forget yes to delete everything" in output
    assert "I deleted 2 messages in 1 conversations" in output
    assert "Storing your conversation: no" in output


@pytest.mark.parametrize(
    ("locale", "note"),
    [("en", "This is the reply that was kept"), ("zh-CN", "以下是保留的回复")],
)
async def test_trimmed_stream_labels_kept_reply(locale: str, note: str) -> None:
    from bots.console import _ReplyPrinter
    from core.manager import Reply, ReplyKind

    output = io.StringIO()
    printer = _ReplyPrinter(output)
    await printer.on_delta("Take a slow breath. Then we can talk about wh")

    printer.finish(Reply(kind=ReplyKind.GENERATED, text="Take a slow breath.", locale=locale))

    lines = output.getvalue().splitlines()
    assert lines[0] == "MindHarbor: Take a slow breath. Then we can talk about wh"
    assert note in lines[1]
    assert lines[2] == "MindHarbor: Take a slow breath."
