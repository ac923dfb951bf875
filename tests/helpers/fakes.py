"""Test doubles for the generator interface, for tests of the code around generation."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.errors import GenerationError
from core.generation.base import (
    ChatMessage,
    DeltaCallback,
    FinishReason,
    GenerationResult,
    Generator,
    SamplingParams,
)
from core.manager import ConversationManager
from core.prompt import PromptBuilder


class FakeGenerator(Generator):
    """Answers at once with a reply derived from the newest user message.

    Tokens are counted as whitespace-separated words plus half the UTF-8 bytes
    beyond one per character (about one per CJK character), plus four per
    message, which is enough for prompt-budget tests and costs next to nothing.
    ``fail`` makes the next calls raise, ``hang`` makes them never finish and
    ``delay_s`` makes them slow. ``reply`` replaces the derived reply text, and
    ``stream_delay_s`` spaces out streamed words.
    """

    name = "fake"

    def __init__(self, *, context_length: int = 4096) -> None:
        self._context_length = context_length
        self.calls: list[list[ChatMessage]] = []
        self.fail = False
        self.hang = False
        self.delay_s = 0.0
        self.stream_delay_s = 0.0
        self.reply: str | None = None
        self.started = False

    @property
    def model_name(self) -> str:
        return "fake-echo"

    @property
    def context_length(self) -> int:
        return self._context_length

    def count_prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        total = 0
        for message in messages:
            content = message.content
            extra_bytes = len(content.encode("utf-8", "surrogatepass")) - len(content)
            total += 4 + len(content.split()) + extra_bytes // 2
        return total + 2

    @property
    def is_ready(self) -> bool:
        return self.started

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    async def generate(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        *,
        on_delta: DeltaCallback | None = None,
    ) -> GenerationResult:
        self.calls.append(list(messages))
        if self.fail:
            raise GenerationError("the fake generator was told to fail")
        if self.hang:
            await asyncio.Event().wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)

        text = self.reply if self.reply is not None else f"reply to: {messages[-1].content[:200]}"
        if on_delta is not None:
            words = text.split(" ")
            for index, word in enumerate(words):
                await on_delta(word if index == len(words) - 1 else word + " ")
                if self.stream_delay_s:
                    await asyncio.sleep(self.stream_delay_s)
        return GenerationResult(
            text=text,
            finish_reason=FinishReason.STOP,
            model=self.model_name,
            prompt_tokens=self.count_prompt_tokens(messages),
            completion_tokens=len(text.split()),
        )


def manager_on(
    sessions: async_sessionmaker[AsyncSession],
    generator: Generator,
    *,
    system_prompts: dict[str, str] | None = None,
    max_new_tokens: int = 64,
    timeout_s: float = 5.0,
    **options: Any,
) -> ConversationManager:
    """Build a conversation manager on ``sessions`` that prompts ``generator`` directly.

    ``options`` go to ConversationManager as they are (safety, pseudonyms, locks...).
    """
    return ConversationManager(
        session_factory=sessions,
        generator=generator,
        prompt_builder=PromptBuilder(
            system_prompts=system_prompts or {"en": "You are a kind listener."},
            count_tokens=generator.count_prompt_tokens,
            context_length=generator.context_length,
            max_new_tokens=max_new_tokens,
        ),
        sampling=SamplingParams(max_new_tokens=max_new_tokens),
        timeout_s=timeout_s,
        **options,
    )
