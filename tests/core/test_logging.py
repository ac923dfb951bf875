"""Log output: JSON lines, secret redaction, and no message text at INFO."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from core.cli import configure_logging
from core.config import DatabaseSettings, Secrets, Settings
from core.logs import REDACTED, build_handler, secret_values
from core.manager import IncomingMessage
from core.service import Service
from tests.helpers.fakes import FakeGenerator

TELEGRAM_TOKEN = "123456789:AAH-fake-telegram-token_for-tests"
DISCORD_TOKEN = "MTIz.fake-discord-token.for-tests"
OPENAI_KEY = "sk-fake-openai-key-for-tests"
PSEUDONYM_KEY = "fake-pseudonym-key-for-tests"
DATABASE_PASSWORD = "db-pass/9871"
SECRETS = (TELEGRAM_TOKEN, DISCORD_TOKEN, OPENAI_KEY, PSEUDONYM_KEY, DATABASE_PASSWORD)

UNIQUE_TEXT = "purple-elephant-4711"


@pytest.fixture
def secret_environment(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TELEGRAM_TOKEN)
    monkeypatch.setenv("DISCORD_BOT_TOKEN", DISCORD_TOKEN)
    monkeypatch.setenv("MINDHARBOR_OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("MINDHARBOR_PSEUDONYM_KEY", PSEUDONYM_KEY)
    password = quote(DATABASE_PASSWORD, safe="")
    settings = Settings(
        database=DatabaseSettings(url=f"postgresql+asyncpg://bot:{password}@127.0.0.1/mh")
    )
    return secret_values(settings, Secrets())


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing JSON lines to a buffer through the service's handler."""
    stream = io.StringIO()
    logger = logging.getLogger("tests.logging.captured")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger, stream
    logger.handlers.clear()
    logger.propagate = True


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_secret_values_read_environment(secret_environment: list[str]) -> None:
    assert sorted(secret_environment) == sorted(SECRETS)


def test_json_line_has_fields_and_extras(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    logger.addHandler(build_handler("json", [], stream))

    logger.info("Replied in conversation %s", 42, extra={"conversation_id": 42})

    [entry] = json_lines(stream.getvalue())
    assert entry["level"] == "INFO"
    assert entry["logger"] == "tests.logging.captured"
    assert entry["message"] == "Replied in conversation 42"
    assert entry["conversation_id"] == 42
    assert str(entry["time"]).endswith("+00:00")


def test_json_exception_stays_on_one_line(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    logger.addHandler(build_handler("json", [], stream))

    try:
        raise ValueError("first line\nsecond line")
    except ValueError:
        logger.exception("Handling failed")

    assert len(stream.getvalue().splitlines()) == 1
    [entry] = json_lines(stream.getvalue())
    assert "ValueError: first line\nsecond line" in str(entry["exception"])


def test_secrets_redacted_everywhere(
    secret_environment: list[str], captured: tuple[logging.Logger, io.StringIO]
) -> None:
    logger, stream = captured
    handler = build_handler("json", secret_environment, stream)
    logger.addHandler(handler)

    logger.error("Tokens %s and %s", TELEGRAM_TOKEN, DISCORD_TOKEN)
    logger.error("Request to https://api.telegram.org/bot%s/getUpdates failed", TELEGRAM_TOKEN)
    logger.error("Encoded in a query: https://example.test/?key=%s", quote(OPENAI_KEY, safe=""))
    logger.error("Keys", extra={"settings": {"key": PSEUDONYM_KEY, "list": [OPENAI_KEY]}})
    logger.error("Database password %s in the message", DATABASE_PASSWORD)
    try:
        raise RuntimeError(f"connect failed with {OPENAI_KEY}")
    except RuntimeError:
        logger.exception("Calling the server failed")
    # Arguments that do not fit the format; straight to the handler, because pytest's own
    # log capture raises on such a record.
    malformed = logger.makeRecord(
        logger.name, logging.ERROR, __file__, 0, "Bad arguments %s %s", (TELEGRAM_TOKEN,), None
    )
    handler.handle(malformed)

    output = stream.getvalue()
    for secret in SECRETS:
        assert secret not in output
        assert quote(secret, safe="") not in output
    entries = json_lines(output)
    assert len(entries) == 7
    assert entries[1]["message"] == (
        f"Request to https://api.telegram.org/bot{REDACTED}/getUpdates failed"
    )
    assert entries[3]["settings"] == {"key": REDACTED, "list": [REDACTED]}
    assert REDACTED in str(entries[5]["exception"])
    assert entries[6]["message"] == f"Bad arguments %s %s ('{REDACTED}',)"


def test_redaction_in_text_format(
    secret_environment: list[str], captured: tuple[logging.Logger, io.StringIO]
) -> None:
    logger, stream = captured
    logger.addHandler(build_handler("text", secret_environment, stream))

    logger.warning("token=%s", TELEGRAM_TOKEN)

    assert stream.getvalue().rstrip().endswith(f"WARNING tests.logging.captured: token={REDACTED}")


def test_configure_logging_installs_redaction(
    secret_environment: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    level = root.level
    try:
        configure_logging("INFO", "json", secret_environment)
        logging.getLogger("telegram.ext.Updater").error(
            "POST https://api.telegram.org/bot%s/getUpdates", TELEGRAM_TOKEN
        )
        logging.getLogger("tests.logging").debug("below the level")
    finally:
        root.setLevel(level)
        for name in ("httpx", "httpcore", "sqlalchemy.engine", "alembic", "asyncio", "urllib3"):
            logging.getLogger(name).setLevel(logging.NOTSET)

    [entry] = json_lines(capsys.readouterr().err)
    assert entry["logger"] == "telegram.ext.Updater"
    assert entry["message"] == f"POST https://api.telegram.org/bot{REDACTED}/getUpdates"


async def test_message_text_absent_at_info(sqlite_url: str) -> None:
    stream = io.StringIO()
    handler = build_handler("json", [], stream)
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    generator = FakeGenerator()
    settings = Settings(database=DatabaseSettings(url=sqlite_url))
    try:
        async with Service(settings, Secrets(), generator=generator) as service:

            async def say(text: str) -> None:
                message = IncomingMessage(platform="console", chat_id="c1", user_id="u1", text=text)
                await service.manager.handle(message)

            await say(f"my code word is {UNIQUE_TEXT}")
            await say(f"{UNIQUE_TEXT}: I want to kill myself tonight")
            generator.fail = True
            await say(f"again {UNIQUE_TEXT}")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)

    output = stream.getvalue()
    # The service did log at INFO (start, replies, the risk), just not the text.
    assert "Replied in conversation" in output
    assert "Risk crisis" in output
    assert UNIQUE_TEXT not in output
    assert "kill myself" not in output
    assert all(isinstance(entry, dict) for entry in json_lines(output))
