"""The generator interface: a backend that turns a list of chat messages into a reply."""

from __future__ import annotations

import abc
import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

ChatRole = Literal["system", "user", "assistant"]

# Receives each new piece of reply text while a reply streams.
DeltaCallback = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: ChatRole
    content: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class FinishReason(enum.StrEnum):
    STOP = "stop"  # the model ended its turn
    LENGTH = "length"  # max_new_tokens was reached
    MARKER = "marker"  # the reply was cut at a chat-role marker
    REPETITION = "repetition"  # a sentence looping over and over was trimmed


@dataclass(slots=True, kw_only=True)
class GenerationResult:
    text: str
    finish_reason: FinishReason
    model: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # Facts worth keeping with the assistant turn (retries, trimmed characters...).
    details: dict[str, object] = field(default_factory=dict)


class Generator(abc.ABC):
    """A reply backend with an explicit lifecycle: ``start`` loads, ``stop`` releases.

    Implementations must be safe to call ``generate`` on concurrently from one
    event loop; they batch or queue internally.
    """

    name: str

    @property
    @abc.abstractmethod
    def model_name(self) -> str:
        """Name of the model (and adapter) that writes the replies, stored with each turn."""

    @property
    @abc.abstractmethod
    def context_length(self) -> int:
        """Maximum tokens of prompt plus reply that the model accepts."""

    @abc.abstractmethod
    def count_prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Count the tokens of ``messages`` as a prompt that ends where the reply starts."""

    @property
    def is_ready(self) -> bool:
        """Whether ``generate`` can serve requests now (read by the health check).

        The base class keeps no lifecycle state and returns True. Backends with
        a ``start``/``stop`` lifecycle override it.
        """
        return True

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load models or open connections; calling it twice is harmless."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Release what ``start`` acquired."""

    @abc.abstractmethod
    async def generate(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        *,
        on_delta: DeltaCallback | None = None,
    ) -> GenerationResult:
        """Generate the assistant's reply to ``messages``.

        ``on_delta`` receives reply text as it is produced, when the backend can
        stream. Raises GenerationError (or a subclass) when no reply can be made.
        """

    async def __aenter__(self) -> Generator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
