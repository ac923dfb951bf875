"""``mindharbor run`` with a Telegram token answers real dialogues through the stand-in Bot API."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import sys
from pathlib import Path

import pytest

from core.config import PROJECT_ROOT
from tests.helpers.telegram_standin import TelegramStandin, TgUser
from tests.helpers.tiny_model import build_tiny_chat_model

HOLDOUT = PROJECT_ROOT.parent / "shared" / "data" / "holdout" / "counselling_en_holdout.jsonl"

pytestmark = pytest.mark.skipif(not HOLDOUT.is_file(), reason=f"{HOLDOUT} is not present")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def real_dialogues(count: int) -> list[list[str]]:
    dialogues = []
    with HOLDOUT.open(encoding="utf-8") as lines:
        for line in lines:
            turns = json.loads(line)["conversations"]
            dialogues.append(
                [
                    turn["content"]
                    for turn in turns
                    if turn["role"] == "user" and turn["content"].strip()
                ]
            )
            if len(dialogues) == count:
                break
    return dialogues


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("run-model") / "tiny-chat")


async def start_run(env: dict[str, str]) -> asyncio.subprocess.Process:
    """Start `mindharbor run` offline with ``env`` added, its output in one pipe."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "core.cli",
        "run",
        cwd=PROJECT_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def run_dialogues(server: TelegramStandin, env: dict[str, str], database: Path) -> None:
    process = await start_run(env)
    try:
        await server.wait_for(
            lambda: server.commands_for(""), timeout=120, description="the bot to start"
        )
        dialogues = real_dialogues(5)
        users = [TgUser(id=5000 + index, first_name=f"User{index}") for index in range(5)]
        for user, texts in zip(users, dialogues, strict=True):
            for text in texts:
                server.enqueue_private_text(text, user=user)

        for user, texts in zip(users, dialogues, strict=True):
            replies = await server.wait_for_messages(user.id, len(texts), timeout=180)
            assert len(replies) == len(texts)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), timeout=60)

    assert process.returncode == 0, output.decode()[-3000:]
    with sqlite3.connect(database) as connection:
        for user, texts in zip(users, dialogues, strict=True):
            rows = connection.execute(
                "SELECT turns.role, turns.content FROM turns "
                "JOIN users ON users.id = turns.user_id "
                "WHERE users.platform = 'telegram' AND users.platform_user_id = ? "
                "ORDER BY turns.created_at, turns.id",
                (str(user.id),),
            ).fetchall()
            assert [content for role, content in rows if role == "user"] == texts
            assert [role for role, _ in rows] == ["user", "assistant"] * len(texts)


def base_env(server: TelegramStandin, database: Path, model: Path) -> dict[str, str]:
    return {
        "TELEGRAM_BOT_TOKEN": server.token,
        "MINDHARBOR_TELEGRAM__API_BASE_URL": server.url,
        "MINDHARBOR_TELEGRAM__POLL_TIMEOUT_S": "1",
        "MINDHARBOR_DATABASE__URL": f"sqlite+aiosqlite:///{database}",
        "MINDHARBOR_GENERATOR__LOCAL__MODEL": str(model),
        "MINDHARBOR_GENERATOR__SAMPLING__MAX_NEW_TOKENS": "8",
        "MINDHARBOR_GENERATOR__SAMPLING__TEMPERATURE": "0",
        "MINDHARBOR_PROMPT__CONTEXT_LENGTH": "512",
    }


async def test_run_answers_real_dialogues_polling(tmp_path: Path, tiny_model: Path) -> None:
    database = tmp_path / "run.db"
    async with TelegramStandin() as server:
        await run_dialogues(server, base_env(server, database, tiny_model), database)


async def test_run_answers_real_dialogues_webhook(tmp_path: Path, tiny_model: Path) -> None:
    database = tmp_path / "run.db"
    port = free_port()
    async with TelegramStandin() as server:
        env = {
            **base_env(server, database, tiny_model),
            "MINDHARBOR_TELEGRAM__MODE": "webhook",
            "MINDHARBOR_TELEGRAM__WEBHOOK__PORT": str(port),
            "MINDHARBOR_TELEGRAM__WEBHOOK__PUBLIC_URL": f"http://127.0.0.1:{port}/telegram",
            "TELEGRAM_WEBHOOK_SECRET": "run-test-secret",
        }
        await run_dialogues(server, env, database)
        assert server.webhook is not None
        # A delivery may meet the webhook before its server listens; Telegram
        # retries, and every update must end with a 200 and none with a 403.
        accepted = {delivery.update_id for delivery in server.deliveries if delivery.status == 200}
        assert accepted == {update["update_id"] for update in server.updates}
        assert 403 not in {delivery.status for delivery in server.deliveries}


async def test_run_reports_unreachable_bot_api(tmp_path: Path, tiny_model: Path) -> None:
    # Nothing listens on this port, as when the network is not up yet.
    closed = f"http://127.0.0.1:{free_port()}"
    env = {
        "TELEGRAM_BOT_TOKEN": "123456:TEST-TOKEN",
        "MINDHARBOR_TELEGRAM__API_BASE_URL": closed,
        "MINDHARBOR_TELEGRAM__STARTUP_RETRY_S": "2",
        "MINDHARBOR_DATABASE__URL": f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
        "MINDHARBOR_GENERATOR__LOCAL__MODEL": str(tiny_model),
        "MINDHARBOR_GENERATOR__SAMPLING__MAX_NEW_TOKENS": "8",
        "MINDHARBOR_PROMPT__CONTEXT_LENGTH": "512",
    }
    process = await start_run(env)
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    text = output.decode()

    assert process.returncode == 1
    assert "retrying in" in text
    assert f"The Telegram Bot API at {closed} is unreachable" in text
    assert "Traceback" not in text
