"""Localized text that people chatting with MindHarbor read, from config/messages.yaml."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from core.config import CONFIG_DIR, SUPPORTED_LOCALES

MESSAGES_FILE = CONFIG_DIR / "messages.yaml"


@lru_cache(maxsize=4)
def _catalogue(path: Path = MESSAGES_FILE) -> dict[str, dict[str, str]]:
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    missing = [locale for locale in SUPPORTED_LOCALES if locale not in data]
    if missing:
        raise ValueError(f"{path} has no messages for locale(s) {missing}")
    return data


def text(key: str, locale: str, **values: object) -> str:
    """Return message ``key`` in ``locale`` (else English), filled in with ``values``."""
    catalogue = _catalogue()
    template = catalogue.get(locale, {}).get(key) or catalogue["en"][key]
    return template.format(**values) if values else template
