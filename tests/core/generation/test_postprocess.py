"""Reply clean-up: cutting at chat-role markers, trimming loops, defusing typed markers."""

from __future__ import annotations

import pytest

from core.generation.postprocess import (
    StreamGuard,
    clean_reply,
    cut_at_markers,
    defuse_markers,
    end_at_sentence,
    trim_repetition,
)

MARKERS = ["<|user|>", "<|im_start|>", "<|im_end|>"]


def test_cut_at_first_marker() -> None:
    text, cut = cut_at_markers("Take a breath.<|user|>ok<|im_start|>", MARKERS)
    assert text == "Take a breath."
    assert cut


def test_no_marker_leaves_text() -> None:
    assert cut_at_markers("plain reply", MARKERS) == ("plain reply", False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "I hear you. I hear you. I hear you. I hear you.",
            "I hear you.",
            id="same-sentence-looping",
        ),
        pytest.param(
            "That sounds hard. Tell me more. Tell me more. Tell me more.",
            "That sounds hard. Tell me more.",
            id="loop-after-first-sentence",
        ),
        pytest.param(
            "我明白。你很难过。我明白。你很难过。我明白。你很难过。",
            "我明白。你很难过。",
            id="chinese-two-sentence-loop",
        ),
        pytest.param(
            "Line one of advice\nLine one of advice\nLine one of advice",
            "Line one of advice",
            id="newline-separated",
        ),
    ],
)
def test_loops_trimmed_to_one_copy(text: str, expected: str) -> None:
    trimmed, changed = trim_repetition(text)
    assert trimmed == expected
    assert changed


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("Yes. Yes. Yes.", id="short-sentences"),
        pytest.param(
            "You matter. Sleep has been hard. Work is heavy. You matter.",
            id="one-repeat-far-apart",
        ),
        pytest.param("Mr. Smith paid 3.5 dollars. Mr. Jones paid 4.5 dollars.", id="abbreviations"),
    ],
)
def test_ordinary_text_not_trimmed(text: str) -> None:
    assert trim_repetition(text) == (text, False)


def test_clean_reply_drops_partial_character() -> None:
    cleaned = clean_reply("我明白你的感受，這段時間雙大\ufffd", MARKERS)

    assert cleaned.text == "我明白你的感受，這段時間雙大"


def test_clean_reply_applies_both_steps() -> None:
    cleaned = clean_reply("  Breathe. Breathe slowly. Breathe slowly.<|user|>hi", MARKERS)
    assert cleaned.text == "Breathe. Breathe slowly."
    assert cleaned.cut_at_marker
    assert cleaned.repetition_trimmed


def test_defuse_markers_keeps_text_readable() -> None:
    typed = "please <|im_start|>system and [gMASK] and </s>"
    defused = defuse_markers(typed)
    assert "<|im_start|>" not in defused
    assert "[gMASK]" not in defused
    assert "</s>" not in defused
    assert defused.replace("\u200b", "") == typed


def test_stream_guard_never_emits_marker() -> None:
    guard = StreamGuard(MARKERS)
    pieces = ["Hello", " there <", "|us", "er|> and more"]
    emitted = "".join(guard.feed(piece) for piece in pieces) + guard.flush()

    assert emitted == "Hello there "
    assert guard.stopped


def test_stream_guard_releases_held_prefix() -> None:
    guard = StreamGuard(MARKERS)
    first = guard.feed("a < b")
    second = guard.feed(" c <")
    rest = guard.flush()

    assert first + second + rest == "a < b c <"
    assert not guard.stopped


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "I hear you. Sleep has been hard for weeks. You can choose yourself",
            "I hear you. Sleep has been hard for weeks.",
            id="unfinished-last-sentence",
        ),
        pytest.param(
            "我明白你的感受。失眠真的很难受。你可以试着",
            "我明白你的感受。失眠真的很难受。",
            id="chinese",
        ),
        pytest.param(
            "One short. Then a very long unfinished sentence that goes on and on and on",
            "One short. Then a very long unfinished sentence that goes on and on and on",
            id="too-little-left",
        ),
        pytest.param("no sentence end at all", "no sentence end at all", id="single-piece"),
    ],
)
def test_end_at_sentence(text: str, expected: str) -> None:
    assert end_at_sentence(text) == expected
