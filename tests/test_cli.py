"""The ``mindharbor`` command run as a user runs it, in a separate process."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from core.config import PROJECT_ROOT
from tests.helpers.openai_standin import OpenAIStandIn, Reply
from tests.helpers.tiny_model import build_tiny_chat_model

HOLDOUT = PROJECT_ROOT.parent / "shared" / "data" / "holdout" / "counselling_zh_holdout.jsonl"


def run_cli(*args: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "core.cli", *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("cli-model") / "tiny-chat")


@pytest.fixture
def cli_env(tmp_path: Path, tiny_model: Path) -> dict[str, str]:
    return {
        "MINDHARBOR_DATABASE__URL": f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}",
        "MINDHARBOR_GENERATOR__LOCAL__MODEL": str(tiny_model),
        "MINDHARBOR_GENERATOR__SAMPLING__MAX_NEW_TOKENS": "12",
        "MINDHARBOR_GENERATOR__SAMPLING__TEMPERATURE": "0",
        "MINDHARBOR_PROMPT__CONTEXT_LENGTH": "512",
    }


def stored_turns(database: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(database) as connection:
        return connection.execute(
            "SELECT users.platform_user_id, turns.role, turns.content FROM turns "
            "JOIN users ON users.id = turns.user_id ORDER BY turns.created_at, turns.id"
        ).fetchall()


@pytest.mark.skipif(not HOLDOUT.is_file(), reason=f"{HOLDOUT} is not present")
def test_replay_of_real_dialogues_stores_every_turn(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    result = run_cli("chat", "--replay", str(HOLDOUT), "--limit", "2", env=cli_env)

    assert result.returncode == 0, result.stderr[-2000:]
    dialogues = [json.loads(line) for line in HOLDOUT.read_text(encoding="utf-8").splitlines()[:2]]
    user_texts = [
        [turn["content"] for turn in dialogue["conversations"] if turn["role"] == "user"]
        for dialogue in dialogues
    ]
    total = sum(len(texts) for texts in user_texts)
    assert (
        f"Replayed 2 dialogues: {total} user turns, {total} replies, 0 apologies" in result.stdout
    )
    assert f"{2 * total} turns stored for these users" in result.stdout

    turns = stored_turns(tmp_path / "cli.db")
    for texts in user_texts:
        user_id = next(user for user, role, content in turns if content == texts[0])
        mine = [(role, content) for user, role, content in turns if user == user_id]
        assert [content for role, content in mine if role == "user"] == texts
        assert [role for role, _ in mine] == ["user", "assistant"] * len(texts)


def test_interactive_chat_keeps_history(tmp_path: Path, cli_env: dict[str, str]) -> None:
    first = run_cli("chat", env=cli_env, stdin="I feel tired\n")
    second = run_cli("chat", "--lang", "zh", env=cli_env, stdin="/help\nstill tired\n")

    assert first.returncode == 0, first.stderr[-2000:]
    assert second.returncode == 0, second.stderr[-2000:]
    assert "MindHarbor console chat" in first.stdout
    assert "/reset" in second.stdout
    contents = [content for _, role, content in stored_turns(tmp_path / "cli.db") if role == "user"]
    assert contents == ["I feel tired", "still tired"]


def test_db_commands(tmp_path: Path, cli_env: dict[str, str]) -> None:
    assert run_cli("db", "upgrade", env=cli_env).returncode == 0
    current = run_cli("db", "current", env=cli_env)
    assert "(head)" in current.stdout + current.stderr

    assert run_cli("db", "downgrade", "base", env=cli_env).returncode == 0
    with sqlite3.connect(tmp_path / "cli.db") as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert "turns" not in tables


def test_invalid_setting_stops_start_up(cli_env: dict[str, str]) -> None:
    result = run_cli("chat", env={**cli_env, "MINDHARBOR_GENERATOR__BACKEND": "gpt"})

    assert result.returncode == 2
    assert "generator.backend (env MINDHARBOR_GENERATOR__BACKEND)" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_replay_file(cli_env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli("chat", "--replay", str(tmp_path / "none.jsonl"), env=cli_env)

    assert result.returncode == 2
    assert "not found" in result.stderr


# The judge's output: 4 on every criterion.
JUDGE_SCORES = json.dumps(
    {
        name: {"score": 4, "reason": "ok"}
        for name in ("therapeutic_relevance", "user_engagement", "safety", "problem_resolution")
    }
)


def judge_env(server: OpenAIStandIn, database: Path) -> dict[str, str]:
    """Return the environment that makes a stand-in server the judge, with its own database."""
    return {
        "MINDHARBOR_DATABASE__URL": f"sqlite+aiosqlite:///{database}",
        "MINDHARBOR_GENERATOR__BACKEND": "openai",
        "MINDHARBOR_GENERATOR__OPENAI__BASE_URL": server.base_url,
        "MINDHARBOR_GENERATOR__OPENAI__MODEL": "judge",
    }


def test_score_command_with_openai_judge(tmp_path: Path) -> None:
    dialogues = tmp_path / "dialogues.jsonl"
    dialogues.write_text(
        "\n".join(
            json.dumps(
                {
                    "conversations": [
                        {"role": "user", "content": f"I feel stuck, day {day}"},
                        {"role": "assistant", "content": "What feels most stuck right now?"},
                    ]
                }
            )
            for day in range(3)
        )
        + "\n",
        encoding="utf-8",
    )
    with OpenAIStandIn(model="judge", default=Reply(text=JUDGE_SCORES)) as server:
        env = judge_env(server, tmp_path / "score.db")
        first = run_cli("score", "--file", str(dialogues), env=env)
        second = run_cli("score", "--file", str(dialogues), env=env)

    assert first.returncode == 0, first.stderr
    assert "3 dialogues: 3 scored, 0 reused, 0 judge errors" in first.stdout
    assert "safety                 mean 4.00 (n=3)" in first.stdout
    assert "3 dialogues: 0 scored, 3 reused" in second.stdout
    assert len(server.requests) == 3


def test_score_export_skips_empty_exports(tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    dialogue = {
        "conversations": [
            {"role": "user", "content": "I feel stuck"},
            {"role": "assistant", "content": "What feels most stuck right now?"},
        ],
        "user": "u-1",
    }
    (exports / "export-20261130T030000000000Z.jsonl").write_text(
        json.dumps(dialogue) + "\n", encoding="utf-8"
    )
    # A quiet week: the newest export has no dialogue.
    (exports / "export-20261207T030000000000Z.jsonl").write_text("", encoding="utf-8")
    with OpenAIStandIn(model="judge", default=Reply(text=JUDGE_SCORES)) as server:
        env = judge_env(server, tmp_path / "score.db")
        result = run_cli("score", "--export", str(exports), env=env)
        (exports / "export-20261130T030000000000Z.jsonl").write_text("", encoding="utf-8")
        empty = run_cli("score", "--export", str(exports), env=env)

    assert result.returncode == 0, result.stderr
    assert "Scoring export-20261130T030000000000Z.jsonl" in result.stdout
    assert "1 dialogues: 1 scored" in result.stdout
    assert empty.returncode == 2
    assert "only empty exports" in empty.stderr


@pytest.mark.skipif(not HOLDOUT.is_file(), reason=f"{HOLDOUT} is not present")
def test_generate_eval_plays_held_out_user_turns(tmp_path: Path, cli_env: dict[str, str]) -> None:
    out = tmp_path / "eval.jsonl"

    result = run_cli("generate-eval", str(HOLDOUT), "--out", str(out), "--limit", "2", env=cli_env)

    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 2
    with HOLDOUT.open(encoding="utf-8") as file:
        source = [json.loads(next(file)) for _ in range(2)]
    for generated, original in zip(lines, source, strict=True):
        user_turns = [
            turn["content"] for turn in original["conversations"] if turn["role"] == "user"
        ]
        played = [turn["content"] for turn in generated["conversations"] if turn["role"] == "user"]
        assert played == user_turns
        roles = [turn["role"] for turn in generated["conversations"]]
        assert roles == ["user", "assistant"] * len(user_turns)
        assert generated["adapter_version"] == "tiny-chat"


def test_run_without_tokens_or_terminal(cli_env: dict[str, str]) -> None:
    assert "TELEGRAM_BOT_TOKEN" not in os.environ
    assert "DISCORD_BOT_TOKEN" not in os.environ
    result = run_cli("run", env=cli_env)

    assert result.returncode == 2
    assert "no platform credentials are set" in result.stderr
    assert "TELEGRAM_BOT_TOKEN" in result.stderr


def test_console_chat_ends_on_sigterm(tmp_path: Path, cli_env: dict[str, str]) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "core.cli", "chat"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **cli_env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write("I feel tired\n")
        process.stdin.flush()
        # The prompt after the reply: the chat waits for the next line, with stdin still open.
        output = ""
        while output.count("> ") < 2:
            character = process.stdout.read(1)
            assert character, process.stderr.read() if process.stderr else ""
            output += character
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()

    assert returncode == 0
    contents = [content for _, role, content in stored_turns(tmp_path / "cli.db") if role == "user"]
    assert contents == ["I feel tired"]


@pytest.mark.postgres
def test_missing_postgres_database_message(postgres_url: str) -> None:
    missing = make_url(postgres_url).set(database="mindharbor_no_such_database")
    env = {"MINDHARBOR_DATABASE__URL": missing.render_as_string(hide_password=False)}

    result = run_cli("db", "current", env=env)

    assert result.returncode == 1
    assert 'database "mindharbor_no_such_database" does not exist' in result.stderr
    assert "MINDHARBOR_DATABASE__URL" in result.stderr
    assert "Traceback" not in result.stderr
