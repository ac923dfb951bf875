"""Log output: plain text or one JSON object per line, with secret values redacted.

The redaction filter sits on the output handler, so it covers records from
every library (python-telegram-bot and httpx put the bot token in request
URLs). It replaces each secret wherever it occurs in the message, its
arguments, the exception and stack text, and extra fields.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Iterable
from typing import IO, Literal
from urllib.parse import quote

from pydantic import SecretStr
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from core.config import Secrets, Settings

REDACTED = "[redacted]"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; the others were passed with ``extra=``.
_PLAIN_RECORD = logging.LogRecord("", logging.INFO, "", 0, "", None, None)
_RECORD_ATTRIBUTES = frozenset([*vars(_PLAIN_RECORD), "message", "asctime", "taskName"])


def secret_values(settings: Settings, secrets: Secrets) -> list[str]:
    """Return the values to redact: every secret environment variable and the database password."""
    values = []
    for name in type(secrets).model_fields:
        value = getattr(secrets, name)
        if isinstance(value, SecretStr) and value.get_secret_value():
            values.append(value.get_secret_value())
    try:
        password = make_url(settings.database.url).password
    except ArgumentError:
        password = None
    if password:
        values.append(str(password))
    return values


class SecretRedactor(logging.Filter):
    """Replace secret values in log records with ``[redacted]``; never drops a record."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # A secret may also appear percent-encoded, as in a URL's path or query.
        forms = {form for secret in secrets if secret for form in (secret, quote(secret, safe=""))}
        # Longest first, so that a secret containing another secret is replaced whole.
        ordered = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def redact(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(REDACTED, text)

    def filter(self, record: logging.LogRecord) -> bool:
        if self._pattern is None:
            return True
        try:
            message = record.getMessage()
        except Exception:
            # Arguments that do not fit the format string; keep both, redacted.
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _RECORD_ATTRIBUTES:
                setattr(record, key, self._redact_value(value))
        return True

    def _redact_value(self, value: object) -> object:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {key: self._redact_value(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self._redact_value(item) for item in value]
        if value is None or isinstance(value, bool | int | float):
            return value
        # Other objects are written with str(); redact that text.
        text = str(value)
        redacted = self.redact(text)
        return redacted if redacted != text else value


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: time, level, logger, message, then extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # Newlines inside values are escaped, so each record stays on one line.
        return json.dumps(entry, ensure_ascii=False, default=str)


def build_handler(
    log_format: Literal["text", "json"],
    secrets: Iterable[str],
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Create the output handler: the chosen format, with the secret redaction filter."""
    handler = logging.StreamHandler(stream)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    handler.addFilter(SecretRedactor(secrets))
    return handler
