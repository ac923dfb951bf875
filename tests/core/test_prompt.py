"""Prompt building: system prompt first, roles alternating, newest user turn kept, within budget."""

from __future__ import annotations

import itertools

import pytest

from core.errors import ConfigError
from core.generation.base import ChatMessage
from core.prompt import HistoryTurn, PromptBuilder, merge_turns
from tests.helpers.fakes import FakeGenerator

SYSTEM = {"en": "You are a kind listener.", "zh-CN": "你是一位温和的倾听者。"}


def builder(context_length: int = 200, max_new_tokens: int = 50) -> PromptBuilder:
    return PromptBuilder(
        system_prompts=SYSTEM,
        count_tokens=FakeGenerator().count_prompt_tokens,
        context_length=context_length,
        max_new_tokens=max_new_tokens,
    )


def turns(*pairs: tuple[str, str]) -> list[HistoryTurn]:
    return [HistoryTurn(role, content) for role, content in pairs]


def assert_well_formed(messages: list[ChatMessage]) -> None:
    assert messages[0].role == "system"
    assert messages[1].role == "user"
    roles = [message.role for message in messages[1:]]
    assert all(first != second for first, second in itertools.pairwise(roles))
    assert messages[-1].role == "user"


def test_prompt_starts_with_system_and_alternates() -> None:
    history = turns(("user", "hello"), ("assistant", "hi, how are you?"), ("user", "not great"))
    built = builder().build(history, "en")

    assert_well_formed(built.messages)
    assert built.messages[0].content == SYSTEM["en"]
    assert [message.content for message in built.messages[1:]] == [
        "hello",
        "hi, how are you?",
        "not great",
    ]
    assert built.dropped_turns == 0


def test_system_prompt_follows_locale() -> None:
    built = builder().build(turns(("user", "你好")), "zh-CN")
    assert built.messages[0].content == SYSTEM["zh-CN"]


def test_unknown_locale_uses_default_prompt() -> None:
    built = builder().build(turns(("user", "hola")), "es")
    assert built.messages[0].content == SYSTEM["en"]


def test_consecutive_turns_merge() -> None:
    history = turns(
        ("assistant", "Hi there, what brings you here?"),
        ("user", "I lost my job."),
        ("user", "And my cat is ill."),
        ("assistant", "That is a lot at once."),
        ("moderator", "A moderator is here too."),
        ("user", "yes"),
    )
    built = builder().build(history, "en")

    assert_well_formed(built.messages)
    assert built.messages[1].content == "I lost my job.\nAnd my cat is ill."
    assert built.messages[2].content == "That is a lot at once.\nA moderator is here too."


def test_leading_assistant_turns_dropped() -> None:
    merged = merge_turns(turns(("assistant", "Hello!"), ("user", "hi")))
    assert merged == [ChatMessage("user", "hi")]


def test_empty_and_system_turns_skipped() -> None:
    merged = merge_turns(
        turns(("user", "  "), ("system", "note"), ("user", "real"), ("assistant", ""))
    )
    assert merged == [ChatMessage("user", "real")]


def test_oldest_turns_dropped_to_fit_budget() -> None:
    history = []
    for index in range(60):
        history.append(HistoryTurn("user", f"message number {index} with some words"))
        history.append(HistoryTurn("assistant", f"answer number {index} with some words"))
    history.append(HistoryTurn("user", "the newest message"))
    prompt_builder = builder(context_length=200, max_new_tokens=50)

    built = prompt_builder.build(history, "en")

    assert_well_formed(built.messages)
    assert built.messages[-1].content == "the newest message"
    assert built.prompt_tokens <= prompt_builder.budget
    assert FakeGenerator().count_prompt_tokens(built.messages) == built.prompt_tokens
    assert built.dropped_turns > 0
    # As many turns as fit: adding the next older pair would overflow.
    kept = len(built.messages) - 1
    older = [ChatMessage("system", SYSTEM["en"])] + [
        ChatMessage(turn.role, turn.content)
        for turn in history[-(kept + 2) :]  # type: ignore[arg-type]
    ]
    assert FakeGenerator().count_prompt_tokens(older) > prompt_builder.budget


def test_oversized_newest_turn_is_shortened_with_marker() -> None:
    words = " ".join(f"w{index}" for index in range(5000))
    prompt_builder = builder(context_length=200, max_new_tokens=50)

    built = prompt_builder.build(
        turns(("user", "earlier"), ("assistant", "ok"), ("user", words)), "en"
    )

    assert built.newest_turn_shortened
    assert len(built.messages) == 2
    newest = built.messages[-1].content
    assert "[…]" in newest
    assert newest.startswith("w0 w1")
    assert newest.endswith("w4999")
    assert built.prompt_tokens <= prompt_builder.budget


def test_history_must_end_with_user_turn() -> None:
    with pytest.raises(ValueError, match="must end with a non-empty user turn"):
        builder().build(turns(("user", "hi"), ("assistant", "hello")), "en")


def test_system_prompt_too_long_for_context() -> None:
    with pytest.raises(ConfigError, match="max_new_tokens"):
        builder(context_length=60, max_new_tokens=50)
