"""Prompt building: the locale's system prompt plus the newest turns that fit the token budget."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from core.config import PromptSettings, Settings, resolve_path
from core.errors import ConfigError
from core.generation.base import ChatMessage, Generator

TokenCounter = Callable[[Sequence[ChatMessage]], int]

# Prompt role of each stored role. A moderator's relayed reply speaks for the bot.
_PROMPT_ROLES = {"user": "user", "assistant": "assistant", "moderator": "assistant"}


@dataclass(frozen=True, slots=True)
class HistoryTurn:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class BuiltPrompt:
    messages: list[ChatMessage]
    prompt_tokens: int
    # Turns of the stored history (after merging) that did not fit the budget.
    dropped_turns: int
    newest_turn_shortened: bool


def load_system_prompts(settings: PromptSettings) -> dict[str, str]:
    prompts = {}
    for locale, path in settings.system_prompts.items():
        file = resolve_path(path)
        try:
            prompts[locale] = file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"prompt.system_prompts.{locale}: cannot read {str(file)!r} ({exc.strerror})"
            ) from None
    return prompts


def merge_turns(history: Sequence[HistoryTurn]) -> list[ChatMessage]:
    """Turn stored history into alternating chat messages that start with a user turn.

    Empty turns and stored system turns are left out, consecutive turns of one
    role are joined with a newline, and assistant turns before the first user
    turn (a conversation the bot opened) are dropped.
    """
    merged: list[ChatMessage] = []
    for turn in history:
        role = _PROMPT_ROLES.get(turn.role)
        content = turn.content.strip()
        if role is None or not content:
            continue
        if merged and merged[-1].role == role:
            merged[-1] = ChatMessage(role, merged[-1].content + "\n" + content)
        else:
            merged.append(ChatMessage(role, content))  # type: ignore[arg-type]

    while merged and merged[0].role != "user":
        merged.pop(0)
    return merged


class PromptBuilder:
    """Build prompts that never exceed ``context_length - max_new_tokens`` tokens."""

    def __init__(
        self,
        *,
        system_prompts: Mapping[str, str],
        count_tokens: TokenCounter,
        context_length: int,
        max_new_tokens: int,
        truncation_marker: str = "[…]",
        default_locale: str = "en",
    ) -> None:
        self._system_prompts = dict(system_prompts)
        self._count = count_tokens
        self._marker = truncation_marker
        self._default_locale = default_locale
        self.budget = context_length - max_new_tokens

        # The longest system prompt plus a fully shortened user turn must fit,
        # or no message could ever be answered.
        for locale, system in self._system_prompts.items():
            floor = self._count([ChatMessage("system", system), ChatMessage("user", self._marker)])
            if floor > self.budget:
                raise ConfigError(
                    f"The system prompt for {locale!r} takes {floor} tokens, but the context "
                    f"length {context_length} minus max_new_tokens {max_new_tokens} leaves "
                    f"{self.budget}. Shorten the prompt, lower generator.sampling.max_new_tokens "
                    "or raise prompt.context_length."
                )

    def system_prompt(self, locale: str) -> str:
        return self._system_prompts.get(locale) or self._system_prompts[self._default_locale]

    def build(
        self, history: Sequence[HistoryTurn], locale: str, *, system_note: str | None = None
    ) -> BuiltPrompt:
        """Build the prompt for a reply to the newest user turn in ``history`` (oldest first).

        ``system_note`` is appended to the system prompt (safety guidance for this turn).
        """
        content = self.system_prompt(locale)
        if system_note:
            # NOTE: the start-up budget check does not count the note; a note
            # longer than the room left only shortens the history more.
            content = f"{content}\n\n{system_note}"
        system = ChatMessage("system", content)
        turns = merge_turns(history)
        if not turns or turns[-1].role != "user":
            raise ValueError("history must end with a non-empty user turn")

        # Candidate starts are user turns; fewer turns never take more tokens,
        # so a binary search finds the earliest start that fits.
        starts = [index for index, turn in enumerate(turns) if turn.role == "user"]
        low, high = 0, len(starts) - 1
        best: int | None = None
        best_tokens = 0
        while low <= high:
            middle = (low + high) // 2
            tokens = self._count([system, *turns[starts[middle] :]])
            if tokens <= self.budget:
                best, best_tokens = middle, tokens
                high = middle - 1
            else:
                low = middle + 1

        if best is not None:
            start = starts[best]
            return BuiltPrompt([system, *turns[start:]], best_tokens, start, False)

        shortened, tokens = self._shorten(system, turns[-1])
        return BuiltPrompt([system, shortened], tokens, len(turns) - 1, True)

    def _shorten(self, system: ChatMessage, newest: ChatMessage) -> tuple[ChatMessage, int]:
        """Keep the start and the end of an oversized user turn with the marker between them."""
        text = newest.content

        def shortened(keep: int) -> ChatMessage:
            head = keep // 2
            tail = keep - head
            return ChatMessage("user", f"{text[:head]}\n{self._marker}\n{text[len(text) - tail :]}")

        # No tokenizer packs more than a few dozen characters into one token of
        # chat text, so the search need not try keeping more than this.
        low, high = 0, min(len(text) - 1, self.budget * 32)
        best = ChatMessage("user", self._marker)
        best_tokens = self._count([system, best])
        while low <= high:
            keep = (low + high) // 2
            candidate = shortened(keep)
            tokens = self._count([system, candidate])
            if tokens <= self.budget:
                best, best_tokens = candidate, tokens
                low = keep + 1
            else:
                high = keep - 1
        return best, best_tokens


def prompt_builder_for(
    settings: Settings, generator: Generator, max_new_tokens: int
) -> PromptBuilder:
    """Build the prompt builder that the settings describe for a started ``generator``."""
    return PromptBuilder(
        system_prompts=load_system_prompts(settings.prompt),
        count_tokens=generator.count_prompt_tokens,
        context_length=settings.prompt.context_length or generator.context_length,
        max_new_tokens=max_new_tokens,
        truncation_marker=settings.prompt.truncation_marker,
        default_locale=settings.chat.default_locale,
    )
