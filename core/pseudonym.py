"""Keyed pseudonyms: a stable, non-reversible name for a user in cases, logs and exports."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from core.config import Secrets

_LOGGER = logging.getLogger(__name__)


class Pseudonymizer:
    """HMAC-SHA256 of ``platform:user id`` under a secret key; the same user always maps alike."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("The pseudonym key must be at least 16 bytes long.")
        self._key = key

    def pseudonym(self, platform: str, platform_user_id: str) -> str:
        digest = hmac.new(
            self._key, f"{platform}:{platform_user_id}".encode(), hashlib.sha256
        ).hexdigest()
        return f"u-{digest[:16]}"


def load_pseudonymizer(secrets_: Secrets, key_file: Path) -> Pseudonymizer:
    """Use MINDHARBOR_PSEUDONYM_KEY, else a random key kept in ``key_file`` (created once).

    A key file suits a single machine; a deployment with several processes
    sets the environment variable so that all of them agree.
    """
    if secrets_.pseudonym_key is not None:
        return Pseudonymizer(secrets_.pseudonym_key.get_secret_value().encode())
    if key_file.exists():
        return Pseudonymizer(key_file.read_bytes().strip())
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    # Created with owner-only permissions: the key links pseudonyms back to people.
    try:
        descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # Another process created it first; use theirs.
        return Pseudonymizer(key_file.read_bytes().strip())
    with os.fdopen(descriptor, "wb") as file:
        file.write(key)
    _LOGGER.warning(
        "MINDHARBOR_PSEUDONYM_KEY is not set; created a pseudonym key in %s. "
        "Set the variable in production so every process uses the same key.",
        key_file,
    )
    return Pseudonymizer(key)
