"""Exceptions raised by the MindHarbor core.

MindHarborError
├── ConfigError                 invalid settings; stops start-up
└── GenerationError             a generator could not produce a reply
    ├── GenerationTimeout       no reply within the configured time
    ├── ContextLengthExceeded   the prompt did not fit the model's context
    └── GeneratorUnavailable    the backend is down or rejected the request
"""

from __future__ import annotations


class MindHarborError(Exception):
    """Base class of every error the core raises on purpose."""


class ConfigError(MindHarborError, ValueError):
    """Settings are missing or invalid; the message names each key and what is allowed."""


class GenerationError(MindHarborError):
    """A generator failed to produce a reply."""

    def __init__(self, message: str, *, original: BaseException | None = None) -> None:
        super().__init__(message)
        self.original = original


class GenerationTimeout(GenerationError, TimeoutError):
    """The generator did not finish within the timeout."""


class ContextLengthExceeded(GenerationError):
    """The backend rejected the prompt as longer than the model's context."""


class GeneratorUnavailable(GenerationError):
    """The backend could not be reached or kept failing after retries."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        original: BaseException | None = None,
    ) -> None:
        super().__init__(message, original=original)
        self.status_code = status_code


class PlatformUnavailable(MindHarborError):
    """A platform's API could not be reached at start-up; the message names it and the cause."""
