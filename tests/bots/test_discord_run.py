"""``mindharbor run`` with a Discord token answers real dialogues through the stand-in server."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from pathlib import Path

import pytest

from core.config import PROJECT_ROOT
from tests.bots.test_telegram_run import start_run
from tests.helpers.discord_standin import GENERAL_CHANNEL_ID, DiscordStandin, DiscordUser
from tests.helpers.tiny_model import build_tiny_chat_model

HOLDOUT = PROJECT_ROOT.parent / "shared" / "data" / "holdout" / "counselling_zh_holdout.jsonl"

pytestmark = pytest.mark.skipif(not HOLDOUT.is_file(), reason=f"{HOLDOUT} is not present")


def real_dialogues(count: int) -> list[list[str]]:
    dialogues = []
    with HOLDOUT.open(encoding="utf-8") as lines:
        for line in lines:
            turns = json.loads(line)["conversations"]
            texts = [t["content"] for t in turns if t["role"] == "user" and t["content"].strip()]
            dialogues.append(texts)
            if len(dialogues) == count:
                break
    return dialogues


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("discord-model") / "tiny-chat")


async def test_run_answers_real_dialogues(tmp_path: Path, tiny_model: Path) -> None:
    database = tmp_path / "run.db"
    dialogues = real_dialogues(5)
    users = [
        DiscordUser(id=1_300_000_000_000_000_000 + index, username=f"person{index}")
        for index in range(5)
    ]

    async with DiscordStandin(heartbeat_interval_ms=1000) as server:
        for user in users:
            server.add_user(user)
        env = {
            "DISCORD_BOT_TOKEN": server.token,
            "MINDHARBOR_DISCORD__API_BASE_URL": server.api_base,
            "MINDHARBOR_DISCORD__GATEWAY_URL": server.gateway_url,
            "MINDHARBOR_DISCORD__SYNC_COMMANDS_ON_START": "true",
            "MINDHARBOR_DISCORD__GUILD_READY_TIMEOUT_S": "0.1",
            "MINDHARBOR_DATABASE__URL": f"sqlite+aiosqlite:///{database}",
            "MINDHARBOR_GENERATOR__LOCAL__MODEL": str(tiny_model),
            "MINDHARBOR_GENERATOR__SAMPLING__MAX_NEW_TOKENS": "8",
            "MINDHARBOR_GENERATOR__SAMPLING__TEMPERATURE": "0",
            "MINDHARBOR_PROMPT__CONTEXT_LENGTH": "512",
        }
        process = await start_run(env)
        try:
            await server.wait_until_connected(timeout=120)
            await server.wait_for(
                lambda: server.commands.get(None), timeout=120, description="command sync"
            )
            bot_id = server.bot.id

            # The first three people talk in direct messages, the other two through /talk.
            places = []
            for index, user in enumerate(users):
                if index < 3:
                    channel = server.create_dm_channel(user)
                    places.append(channel.id)
                    continue
                before = len(server.threads)
                await server.send_interaction_create(GENERAL_CHANNEL_ID, user, "talk")
                await server.wait_for(
                    lambda before=before: len(server.threads) > before,
                    timeout=30,
                    description="a /talk thread",
                )
                places.append(server.threads[-1].id)

            for place, user, texts in zip(places, users, dialogues, strict=True):
                for text in texts:
                    await server.send_message_create(place, user, text)

            for index, (place, texts) in enumerate(zip(places, dialogues, strict=True)):
                # A /talk thread also holds the bot's greeting.
                expected = len(texts) + (1 if index >= 3 else 0)
                await server.wait_for(
                    lambda place=place, expected=expected: (
                        len([m for m in server.messages_in(place) if m.author.id == bot_id])
                        >= expected
                    ),
                    timeout=180,
                    description=f"{expected} replies in channel {place}",
                )
        finally:
            process.send_signal(signal.SIGTERM)
            output, _ = await asyncio.wait_for(process.communicate(), timeout=60)

    assert process.returncode == 0, output.decode()[-3000:]
    with sqlite3.connect(database) as connection:
        for user, texts in zip(users, dialogues, strict=True):
            rows = connection.execute(
                "SELECT turns.role, turns.content FROM turns "
                "JOIN users ON users.id = turns.user_id "
                "WHERE users.platform = 'discord' AND users.platform_user_id = ? "
                "ORDER BY turns.created_at, turns.id",
                (str(user.id),),
            ).fetchall()
            assert [content for role, content in rows if role == "user"] == texts
            assert [role for role, _ in rows] == ["user", "assistant"] * len(texts)
