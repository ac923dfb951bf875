"""Splitting replies to platform limits, and rendering them as Telegram MarkdownV2."""

from __future__ import annotations

import re
import time
from bisect import bisect_right
from collections.abc import Callable
from itertools import accumulate, pairwise

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bots.rendering import (
    ChunkParts,
    MarkdownFlavor,
    escape_markdown_v2,
    split_message,
    split_message_parts,
    to_markdown_v2,
    utf16_length,
)

TELEGRAM_LIMIT = 4096
DISCORD_LIMIT = 2000

PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# A strict MarkdownV2 parser, written from the Bot API's "MarkdownV2 style" rules:
#
# - Any character with code 1 to 126 can be escaped anywhere with a preceding "\".
# - Inside pre and code entities, "`" and "\" must be escaped.
# - Everywhere else "_*[]()~`>#+-=|{}.!" must be escaped.
# - "__" is always taken greedily, left to right, as an underline delimiter.
# - Entities that share characters nest. Pre and code contain no entities and, read
#   strictly, sit inside none.
#
# It is stricter than Telegram: it accepts no links, custom emoji or block quotes, so an
# unescaped "[ ] ( ) >" is an error, and it requires a line break after "```" and the
# language tag.


class MarkdownV2Error(ValueError):
    pass


_ENTITY_DELIMITERS = ("__", "||", "*", "_", "~")
_MUST_ESCAPE = frozenset("_*[]()~`>#+-=|{}.!\\")
_LANGUAGE = re.compile(r"[A-Za-z0-9_+#.-]*")


def parse_markdown_v2(text: str) -> str:
    """Return the text Telegram shows for a MarkdownV2 message; raise MarkdownV2Error if invalid."""
    plain_text: list[str] = []
    open_entities: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i = _read_escape(text, i, plain_text)
        elif char == "`":
            if open_entities:
                raise MarkdownV2Error(f"code at {i} inside the entity {open_entities[-1]!r}")
            if text.startswith("```", i):
                i = _read_pre(text, i + 3, plain_text)
            else:
                i = _read_code(text, i + 1, plain_text)
        else:
            delimiter = next((d for d in _ENTITY_DELIMITERS if text.startswith(d, i)), None)
            if delimiter is None:
                if char in _MUST_ESCAPE:
                    raise MarkdownV2Error(f"unescaped {char!r} at {i}")
                plain_text.append(char)
                i += 1
                continue
            if delimiter not in open_entities:
                open_entities.append(delimiter)
            elif open_entities[-1] == delimiter:
                open_entities.pop()
            else:
                raise MarkdownV2Error(
                    f"{delimiter!r} at {i} ends an entity that overlaps {open_entities[-1]!r}"
                )
            i += len(delimiter)
    if open_entities:
        raise MarkdownV2Error(f"can't find end of the entity {open_entities[-1]!r}")
    return "".join(plain_text)


def _read_escape(text: str, i: int, plain_text: list[str]) -> int:
    if i + 1 >= len(text):
        raise MarkdownV2Error(f"backslash at the end, position {i}")
    escaped = text[i + 1]
    if not 1 <= ord(escaped) <= 126:
        raise MarkdownV2Error(f"{escaped!r} at {i + 1} can't be escaped")
    plain_text.append(escaped)
    return i + 2


def _read_code_content(text: str, i: int, plain_text: list[str], closing: str) -> int:
    """Read up to the unescaped ``closing`` delimiter; return the position after it."""
    while i < len(text):
        if text[i] == "\\":
            i = _read_escape(text, i, plain_text)
        elif text.startswith(closing, i):
            return i + len(closing)
        elif text[i] == "`":
            raise MarkdownV2Error(f"unescaped '`' at {i} inside code")
        else:
            plain_text.append(text[i])
            i += 1
    raise MarkdownV2Error(f"can't find end of the code entity {closing!r}")


def _read_pre(text: str, i: int, plain_text: list[str]) -> int:
    line_end = text.find("\n", i)
    if line_end == -1 or not _LANGUAGE.fullmatch(text, i, line_end):
        raise MarkdownV2Error(f"invalid language line after ``` at {i}")
    return _read_code_content(text, line_end + 1, plain_text, "```")


def _read_code(text: str, i: int, plain_text: list[str]) -> int:
    return _read_code_content(text, i, plain_text, "`")


# Helpers


def non_space(text: str) -> str:
    return "".join(char for char in text if not char.isspace())


def cluster_spans(text: str) -> list[tuple[int, int]]:
    offsets = list(accumulate(map(len, regex.findall(r"\X", text)), initial=0))
    return list(pairwise(offsets))


def assert_valid_split(
    text: str,
    parts: list[ChunkParts],
    limit: int,
    measure: Callable[[str], int],
) -> None:
    """Check the contract of split_message_parts on one input.

    Each chunk fits the limit and has non-whitespace content. The bodies appear in ``text``
    in order with only whitespace between them, so the bodies contain all non-whitespace
    characters of ``text`` in order. Every body starts and ends on a grapheme cluster
    boundary, except inside a cluster too wide to fit a chunk with that chunk's added
    markup. The added markup contains only delimiters and code block tags.
    """
    spans = cluster_spans(text)
    starts = [start for start, _ in spans]
    boundaries = {0, len(text), *starts}
    position = 0
    for part in parts:
        assert measure(part.text) <= limit, part
        assert part.body.strip(), part
        assert REOPENED.fullmatch(part.reopened), part
        assert CLOSED.fullmatch(part.closed), part

        start = text.index(part.body, position)
        assert text[position:start].strip() == "", (position, start)
        end = start + len(part.body)
        for edge in (start, end):
            if edge in boundaries:
                continue
            cluster_start, cluster_end = spans[bisect_right(starts, edge) - 1]
            cluster = text[cluster_start:cluster_end]
            overhead = measure(part.reopened) + measure(part.closed)
            assert measure(cluster) + overhead > limit, f"cut inside {cluster!r} at {edge}"
        position = end
    assert text[position:].strip() == ""
    assert non_space("".join(part.body for part in parts)) == non_space(text)


REOPENED = re.compile(r"(?:`{3,16}[A-Za-z0-9_+#.-]*\n|`{1,16}|\*\*|\*|__|_|~~|\|\|)*")
CLOSED = re.compile(r"(?:\n`{3,16}|`{1,16}|\*\*|\*|__|_|~~|\|\|)*")


def assert_discord_balanced(chunk: str) -> None:
    """Check that the code and spans of a chunk all close (for text whose words have no markup)."""
    open_spans: list[str] = []
    i = 0
    while i < len(chunk):
        if chunk.startswith("```", i):
            end = chunk.find("```", i + 3)
            assert end != -1, f"unclosed code block in {chunk!r}"
            i = end + 3
        elif chunk[i] == "`":
            end = chunk.find("`", i + 1)
            assert end != -1, f"unclosed code span in {chunk!r}"
            i = end + 1
        else:
            delimiter = next(
                (d for d in ("**", "__", "~~", "||", "*", "_") if chunk.startswith(d, i)), None
            )
            if delimiter is None:
                i += 1
                continue
            if open_spans and open_spans[-1] == delimiter:
                open_spans.pop()
            else:
                assert delimiter not in open_spans, f"{delimiter!r} crosses a span in {chunk!r}"
                open_spans.append(delimiter)
            i += len(delimiter)
    assert not open_spans, f"unclosed {open_spans} in {chunk!r}"


# utf16_length


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", 0, id="empty"),
        pytest.param("hello", 5, id="ascii"),
        pytest.param("你好", 2, id="bmp-cjk"),
        pytest.param("😀", 2, id="astral-emoji"),
        pytest.param("👩‍👩‍👧‍👦", 11, id="zwj-family"),
        pytest.param("🇺🇦", 4, id="flag"),
        pytest.param("\ud800", 1, id="lone-surrogate"),
    ],
)
def test_utf16_length(text: str, expected: int) -> None:
    assert utf16_length(text) == expected


# Boundary rules


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        pytest.param(
            "First paragraph.\nStill the first.\n\nSecond one.",
            40,
            ["First paragraph.\nStill the first.", "Second one."],
            id="paragraph-before-line",
        ),
        pytest.param(
            "Line one is here\nline two. More words",
            30,
            ["Line one is here", "line two. More words"],
            id="line-before-sentence",
        ),
        pytest.param(
            "One sentence. Another one goes here",
            24,
            ["One sentence.", "Another one goes here"],
            id="sentence-before-word",
        ),
        pytest.param(
            "Are you ok? I hope so! Take care",
            25,
            ["Are you ok? I hope so!", "Take care"],
            id="question-and-exclamation",
        ),
        pytest.param(
            "She said “Really?” and left quietly",
            24,
            ["She said “Really?”", "and left quietly"],
            id="closing-quote-stays",
        ),
        pytest.param(
            "Version 3.14 works fine today",
            16,
            ["Version 3.14", "works fine today"],
            id="dot-inside-number-no-sentence",
        ),
        pytest.param(
            "Well… maybe we can talk later",
            12,
            ["Well…", "maybe we can", "talk later"],
            id="ellipsis",
        ),
        pytest.param(
            "words without any ending",
            13,
            ["words without", "any ending"],
            id="word",
        ),
        pytest.param(
            "abcdefghijkl",
            5,
            ["abcde", "fghij", "kl"],
            id="grapheme-fallback",
        ),
        pytest.param(
            "我很好。你呢？我们走吧",
            6,
            ["我很好。", "你呢？", "我们走吧"],
            id="chinese-sentence-ends",
        ),
        pytest.param(
            "好的，我们明天见面吧",
            5,
            ["好的，", "我们明天见", "面吧"],
            id="chinese-comma-then-grapheme",
        ),
        pytest.param(
            "你好！！然后呢",
            4,
            ["你好！！", "然后呢"],
            id="repeated-fullwidth-marks-stay",
        ),
        pytest.param(
            "“你好吗？”我问",
            6,
            ["“你好吗？”", "我问"],
            id="chinese-closing-quote-stays",
        ),
        pytest.param(
            "first   \n\n\n   second",
            8,
            ["first", "second"],
            id="whitespace-at-split-dropped",
        ),
        pytest.param(
            "  indented start and more",
            14,
            ["  indented", "start and more"],
            id="leading-whitespace-kept",
        ),
        pytest.param(
            "one two three  ",
            9,
            ["one two", "three  "],
            id="trailing-whitespace-kept",
        ),
        pytest.param("fits", 4, ["fits"], id="exactly-at-limit"),
        pytest.param("  fits \n", 20, ["  fits \n"], id="short-text-unchanged"),
        pytest.param("", 10, [], id="empty"),
        pytest.param(" \n\t ", 10, [], id="whitespace-only"),
    ],
)
def test_split_boundary_rules(text: str, limit: int, expected: list[str]) -> None:
    assert split_message(text, limit, measure=len) == expected


def test_split_prefers_last_paragraph_in_window() -> None:
    text = "a.\n\nb.\n\nc. " + "word " * 20

    chunks = split_message(text, 40, measure=len)

    assert chunks[0] == "a.\n\nb."


def test_split_crlf_line_breaks() -> None:
    chunks = split_message("first line\r\nsecond line", 15, measure=len)

    assert chunks == ["first line", "second line"]


def test_split_rejects_limit_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        split_message("text", 0)


def test_split_rejects_limit_below_one_code_point() -> None:
    with pytest.raises(ValueError, match="too small"):
        split_message("😀😀", 1)


# Grapheme clusters


GRAPHEME_CASES = [
    pytest.param("😀", id="surrogate-pair"),
    pytest.param("👩\u200d👩\u200d👧\u200d👦", id="zwj-family"),
    pytest.param("🏳️\u200d🌈", id="zwj-rainbow-flag"),
    pytest.param("🇺🇦", id="regional-flag"),
    pytest.param("1\ufe0f\u20e3", id="keycap"),
    pytest.param("👍🏽", id="skin-tone"),
    pytest.param("e\u0301", id="combining-acute"),
    pytest.param("a\u0308\u0323", id="two-combining-marks"),
    pytest.param("\u1100\u1161\u11a8", id="hangul-jamo"),
    pytest.param("\u0915\u094d\u0937", id="devanagari-conjunct"),
]


@pytest.mark.parametrize("cluster", GRAPHEME_CASES)
@pytest.mark.parametrize("measure", [len, utf16_length], ids=["len", "utf16"])
def test_split_never_cuts_cluster(cluster: str, measure: Callable[[str], int]) -> None:
    limit = 20
    # A cut at the limit, counted in code points or code units, falls inside the cluster.
    for filler in range(limit - measure(cluster) + 1, limit):
        text = "a" * filler + cluster + "b" * 30

        chunks = split_message(text, limit, measure=measure)

        assert chunks[0] == "a" * filler
        assert chunks[1].startswith(cluster)
        assert "".join(chunks) == text
        assert all(measure(chunk) <= limit for chunk in chunks)


@pytest.mark.parametrize("cluster", GRAPHEME_CASES)
def test_split_keeps_clusters_in_long_runs(cluster: str) -> None:
    text = cluster * 200

    chunks = split_message(text, 64)

    assert "".join(chunks) == text
    for chunk in chunks:
        assert utf16_length(chunk) <= 64
        assert chunk == cluster * (len(chunk) // len(cluster))


def test_split_cuts_cluster_wider_than_limit() -> None:
    cluster = "e" + "\u0301" * 30
    text = "start " + cluster + " end"

    parts = split_message_parts(text, 10)

    assert_valid_split(text, parts, 10, utf16_length)
    assert "".join(part.body for part in parts) == "start" + cluster + "end"


# Platform limits


def test_telegram_limit_counts_utf16_for_emoji() -> None:
    text = "😀" * 3000  # 3000 characters, 6000 UTF-16 code units

    chunks = split_message(text, TELEGRAM_LIMIT)

    assert [utf16_length(chunk) for chunk in chunks] == [4096, 1904]
    assert "".join(chunks) == text


def test_telegram_limit_emoji_heavy_sentences() -> None:
    sentence = "I hear you 👩\u200d👩\u200d👧\u200d👦🇺🇦💙. "
    text = sentence * 600  # 13800 characters, 18000 UTF-16 code units

    chunks = split_message(text, TELEGRAM_LIMIT)

    # Counting characters would allow 4 chunks, which Telegram would reject as too long.
    assert len(chunks) == 5
    for chunk in chunks:
        assert utf16_length(chunk) <= TELEGRAM_LIMIT
        assert len(chunk) <= TELEGRAM_LIMIT
        assert chunk.rstrip().endswith("💙.")
    assert non_space("".join(chunks)) == non_space(text)


def test_discord_limit_counts_characters() -> None:
    text = ("Take a slow breath. " * 300).strip()

    chunks = split_message(text, DISCORD_LIMIT, measure=len, markdown=MarkdownFlavor.DISCORD)

    assert all(len(chunk) <= DISCORD_LIMIT for chunk in chunks)
    assert all(chunk.endswith("breath.") for chunk in chunks)
    assert len(chunks) == 3


def test_chinese_text_without_spaces() -> None:
    text = "我理解你现在的感受" * 600  # no spaces and no punctuation

    chunks = split_message(text, TELEGRAM_LIMIT)

    assert [len(chunk) for chunk in chunks] == [4096, 1304]
    assert "".join(chunks) == text


def test_chinese_text_splits_after_sentence_end() -> None:
    text = "我理解你现在的感受，这很正常。" * 400

    chunks = split_message(text, TELEGRAM_LIMIT)

    assert all(chunk.endswith("。") for chunk in chunks)
    assert "".join(chunks) == text


# Markdown balancing


def test_code_block_reopened_with_tag() -> None:
    code = "\n".join(f"    print('line {n}')" for n in range(200))
    text = f"Here is the script:\n\n```python\n{code}\n```\n\nRun it daily."

    chunks = split_message(text, DISCORD_LIMIT, measure=len, markdown=MarkdownFlavor.DISCORD)

    # The paragraph break before the block is the preferred first split.
    assert chunks[0] == "Here is the script:"
    code_chunks = chunks[1:]
    assert len(code_chunks) > 2
    for chunk in code_chunks:
        assert chunk.startswith("```python\n    print(")
        assert len(chunk) <= DISCORD_LIMIT
        assert chunk.count("```") == 2
    for chunk in code_chunks[:-1]:
        assert chunk.endswith("')\n```")
    assert chunks[-1].endswith("```\n\nRun it daily.")


def test_code_block_without_tag_reopened_bare() -> None:
    text = "```\n" + "x = 1\n" * 30 + "```"

    chunks = split_message(text, 60, measure=len, markdown=MarkdownFlavor.BASIC)

    assert all(chunk.startswith("```\nx = 1") for chunk in chunks)
    assert all(chunk.endswith("x = 1\n```") for chunk in chunks)


def test_code_block_closing_counts_against_limit() -> None:
    text = "```sql\n" + "SELECT 1;\n" * 50 + "```"
    limit = 64

    parts = split_message_parts(text, limit, measure=len, markdown=MarkdownFlavor.DISCORD)

    assert all(len(part.text) <= limit for part in parts)
    assert [part.reopened for part in parts[1:]] == ["```sql\n"] * (len(parts) - 1)
    assert [part.closed for part in parts[:-1]] == ["\n```"] * (len(parts) - 1)


@pytest.mark.parametrize(
    "delimiter",
    [
        pytest.param("**", id="bold"),
        pytest.param("*", id="italic-asterisk"),
        pytest.param("_", id="italic-underscore"),
        pytest.param("__", id="underline"),
        pytest.param("~~", id="strikethrough"),
        pytest.param("||", id="spoiler"),
        pytest.param("`", id="code"),
    ],
)
def test_discord_span_balanced_in_each_chunk(delimiter: str) -> None:
    inner = " ".join(f"word{n}" for n in range(600))
    text = f"Words before {delimiter}{inner}{delimiter} after."

    chunks = split_message(text, DISCORD_LIMIT, measure=len, markdown=MarkdownFlavor.DISCORD)

    assert len(chunks) == 3
    for chunk in chunks:
        assert len(chunk) <= DISCORD_LIMIT
        assert_discord_balanced(chunk)
    assert chunks[0].startswith(f"Words before {delimiter}word0 ")
    assert chunks[0].endswith(delimiter)
    assert chunks[1].startswith(f"{delimiter}word")
    assert chunks[1].endswith(delimiter)
    assert chunks[2].endswith(f"{delimiter} after.")


def test_discord_nested_spans_reopened_in_order() -> None:
    inner = " ".join(["calm"] * 40)
    text = f"**bold ~~struck ||{inner}|| end~~ done**"

    parts = split_message_parts(text, 80, measure=len, markdown=MarkdownFlavor.DISCORD)

    assert parts[1].reopened == "**~~||"
    assert parts[0].closed == "||~~**"
    for part in parts:
        assert_discord_balanced(part.text)


def test_italic_inside_bold_reopened_in_order() -> None:
    italic = " ".join(["softly"] * 40)
    text = f"**bold start *{italic}* bold end**"

    parts = split_message_parts(text, 60, measure=len, markdown=MarkdownFlavor.DISCORD)

    assert_valid_split(text, parts, 60, len)
    assert "***" in [part.reopened for part in parts]
    for part in parts:
        # Every asterisk pairs up again, so Telegram would show none of them.
        assert parse_markdown_v2(to_markdown_v2(part.text)) == part.body.replace("*", "")


def test_bold_inside_italic_split_outside_bold() -> None:
    words = " ".join(["gently"] * 30)
    text = f"*{words} **short bold** {words}*"

    parts = split_message_parts(text, 60, measure=len, markdown=MarkdownFlavor.DISCORD)

    assert_valid_split(text, parts, 60, len)
    assert {part.reopened for part in parts} == {"", "*"}
    for part in parts:
        assert parse_markdown_v2(to_markdown_v2(part.text)) == part.body.replace("*", "")


def test_split_avoids_empty_span_and_delimiter_merge() -> None:
    text = "*a **" + "b " * 30 + "c** d*"

    parts = split_message_parts(text, 24, measure=len, markdown=MarkdownFlavor.DISCORD)

    assert_valid_split(text, parts, 24, len)
    for part in parts:
        assert "****" not in part.text
        if part.reopened:
            assert not part.body.startswith("*")


def test_markdown_off_leaves_markup_alone() -> None:
    text = "**" + "word " * 30 + "**"

    chunks = split_message(text, 40, measure=len)

    assert chunks[0].startswith("**word")
    assert not chunks[0].endswith("**")
    assert "".join(chunks).replace(" ", "") == text.replace(" ", "")


def test_escaped_delimiter_is_not_a_span() -> None:
    text = r"\*not italic " + "word " * 20 + r"still not\*"

    parts = split_message_parts(text, 30, measure=len, markdown=MarkdownFlavor.DISCORD)

    assert all(part.reopened == "" and part.closed == "" for part in parts)


def test_markdown_limit_too_small_for_delimiters() -> None:
    text = "```python\n" + "code " * 10 + "\n```"

    with pytest.raises(ValueError, match="too small"):
        split_message(text, 8, measure=len, markdown=MarkdownFlavor.DISCORD)


# Linear time


def long_reply(size: int) -> str:
    paragraph = (
        "I hear how heavy this week has been 💙. It makes sense to feel tired. "
        "我理解你的感受，这很正常。Let's take one small step **together** today, "
        "*slowly*, with `breathing` exercises.\n\n"
    )
    return (paragraph * (size // len(paragraph) + 1))[:size]


@pytest.mark.parametrize("markdown", [None, MarkdownFlavor.DISCORD], ids=["plain", "discord"])
def test_split_measures_linearly(
    markdown: MarkdownFlavor | None,
) -> None:
    text = long_reply(100_000)
    measured = 0

    def counting_length(piece: str) -> int:
        nonlocal measured
        measured += len(piece)
        return utf16_length(piece)

    parts = split_message_parts(text, 200, measure=counting_length, markdown=markdown)

    assert len(parts) > 500
    # Once for the whole-text check, once per unit, plus the short added markup per chunk.
    assert measured <= 2 * len(text) + 64 * len(parts)
    assert_valid_split(text, parts, 200, utf16_length)


def test_split_time_grows_linearly() -> None:
    def best_time(size: int) -> float:
        text = long_reply(size)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            split_message(text, 100, markdown=MarkdownFlavor.DISCORD)
            times.append(time.perf_counter() - started)
        return min(times)

    small, large = best_time(10_000), best_time(100_000)

    # 10 times the text: about 10 times the time when linear, 100 times when quadratic.
    assert large / small < 30, (small, large)


# Property tests for splitting


SAMPLE_PIECES = [
    "👩\u200d👩\u200d👧\u200d👦",
    "🏳️\u200d🌈",
    "🇺🇦",
    "1\ufe0f\u20e3",
    "👍🏽",
    "😀",
    "e\u0301",
    "\u1100\u1161\u11a8",
    "\n",
    "\n\n",
    "\r\n",
    " ",
    "   ",
    "\t",
    ". ",
    "! ",
    "? ",
    "。",
    "！",
    "？",
    "；",
    "…",
    "，",
    "”",
    "我们",
    "word",
    "Hello there",
    "```",
    "```python\n",
    "\n```",
    "`",
    "``",
    "**",
    "*",
    "_",
    "__",
    "~~",
    "||",
    "\\",
    "\\*",
    "[",
    "](",
    ")",
    ">",
    "#",
    "-",
    ".",
    "!",
]

text_pieces = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=12),
    st.sampled_from(SAMPLE_PIECES),
    st.text(alphabet="ab *_`~|\\\n.", max_size=12),
)
reply_texts = st.lists(text_pieces, max_size=300).map("".join)
long_reply_texts = st.lists(text_pieces, min_size=40, max_size=400).map("".join)
measures = st.sampled_from([len, utf16_length])


def draw_limit(data: st.DataObject, text: str, lowest: int, measure: Callable[[str], int]) -> int:
    """Draw a limit from ``lowest`` to 5000, mostly below the text's size so that it splits."""
    size = measure(text)
    return data.draw(
        st.one_of(st.integers(lowest, max(lowest, size)), st.integers(lowest, 5000)), label="limit"
    )


@PROPERTY_SETTINGS
@given(text=st.one_of(reply_texts, long_reply_texts), measure=measures, data=st.data())
def test_split_plain_property(
    text: str, measure: Callable[[str], int], data: st.DataObject
) -> None:
    limit = draw_limit(data, text, 20, measure)

    parts = split_message_parts(text, limit, measure=measure)

    assert [part.text for part in parts] == split_message(text, limit, measure=measure)
    assert all(part.reopened == part.closed == "" for part in parts)
    assert_valid_split(text, parts, limit, measure)
    if text.strip() and measure(text) <= limit:
        assert [part.text for part in parts] == [text]


@PROPERTY_SETTINGS
@given(
    text=long_reply_texts,
    measure=measures,
    markdown=st.sampled_from(list(MarkdownFlavor)),
    data=st.data(),
)
def test_split_markdown_property(
    text: str, measure: Callable[[str], int], markdown: MarkdownFlavor, data: st.DataObject
) -> None:
    """With markdown on, the same contract holds for the bodies; added markup is only delimiters."""
    limit = draw_limit(data, text, 128, measure)

    parts = split_message_parts(text, limit, measure=measure, markdown=markdown)

    assert_valid_split(text, parts, limit, measure)


WORDS = st.sampled_from(
    [
        "calm",
        "breathe",
        "sleep.",
        "ok!",
        "why?",
        "今天",
        "是的。",
        "很好，",
        "👩\u200d👩\u200d👧\u200d👦",
        "🇺🇦",
        "e\u0301te\u0301",
        "1\ufe0f\u20e3",
        "x" * 40,
    ]
)
CODE_WORDS = st.sampled_from(["a*b", "snake_case", "x ~~ y", "a || b", "print(1)", "   ", "é"])
SPAN_DELIMITERS = ("**", "*", "__", "_", "~~", "||")


@st.composite
def discord_inline(
    draw: st.DrawFn, depth: int = 0, open_characters: frozenset[str] = frozenset()
) -> str:
    """Draw well-formed Discord inline text: words, code spans, spans nested in other kinds."""
    items = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["word", "word", "code", "span"] if depth < 3 else ["word"]))
        if kind == "word":
            items.append(draw(WORDS))
        elif kind == "code":
            items.append("`" + " ".join(draw(st.lists(CODE_WORDS, min_size=1, max_size=5))) + "`")
        else:
            choices = [d for d in SPAN_DELIMITERS if d[0] not in open_characters]
            if not choices:
                items.append(draw(WORDS))
                continue
            delimiter = draw(st.sampled_from(choices))
            inner = draw(discord_inline(depth + 1, open_characters | {delimiter[0]}))
            items.append(f"{delimiter}{draw(WORDS)} {inner} {draw(WORDS)}{delimiter}")
    return " ".join(items)


@st.composite
def discord_replies(draw: st.DrawFn) -> str:
    paragraphs = []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            paragraphs.append(draw(discord_inline()))
        else:
            tag = draw(st.sampled_from(["", "python", "c++", "sh"]))
            lines = draw(st.lists(st.lists(CODE_WORDS, max_size=6).map(" ".join), max_size=30))
            paragraphs.append(f"```{tag}\n" + "\n".join(lines) + "\n```")
    return "\n\n".join(paragraphs)


@PROPERTY_SETTINGS
@given(text=discord_replies(), limit=st.integers(128, 2000))
def test_discord_chunks_balanced_property(text: str, limit: int) -> None:
    parts = split_message_parts(text, limit, measure=len, markdown=MarkdownFlavor.DISCORD)

    assert_valid_split(text, parts, limit, len)
    for part in parts:
        assert_discord_balanced(part.text)


# MarkdownV2 escaping and conversion


def test_escape_markdown_v2_every_special_character() -> None:
    special = "_*[]()~`>#+-=|{}.!\\"

    escaped = escape_markdown_v2(special)

    assert escaped == "".join("\\" + char for char in special)
    assert parse_markdown_v2(escaped) == special


def test_escape_markdown_v2_leaves_other_text() -> None:
    text = "Hello, 你好 😀 — 100% ok? @user $5 ^_^"

    assert parse_markdown_v2(escape_markdown_v2(text)) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("Hello.", r"Hello\.", id="plain-escaped"),
        pytest.param("**strong** words", r"*strong* words", id="bold-asterisks"),
        pytest.param("__strong__ words", r"*strong* words", id="bold-underscores"),
        pytest.param("*soft* words", r"_soft_ words", id="italic-asterisk"),
        pytest.param("_soft_ words", r"_soft_ words", id="italic-underscore"),
        pytest.param("**a *b* c**", r"*a _b_ c*", id="italic-inside-bold"),
        pytest.param("*a **b** c*", r"_a *b* c_", id="bold-inside-italic"),
        pytest.param("*a**b*", r"_ab_", id="adjacent-italics-merge"),
        pytest.param("**a __b__ c**", r"*a b c*", id="bold-inside-bold"),
        pytest.param("use `x_y(1)` now", r"use `x_y(1)` now", id="inline-code"),
        pytest.param(r"`a\b`", r"`a\\b`", id="inline-code-backslash"),
        pytest.param("``a`b``", r"`a\`b`", id="double-backtick-code"),
        pytest.param(
            "```python\nprint('*hi*')\n```",
            "```python\nprint('*hi*')\n```",
            id="code-block-with-tag",
        ),
        pytest.param("```\na`b\\c\n```", "```\na\\`b\\\\c\n```", id="code-block-escapes"),
        pytest.param("**bold `code` bold**", r"*bold *`code`* bold*", id="code-closes-bold"),
        pytest.param("2 * 3 * 4", r"2 \* 3 \* 4", id="spaced-asterisks-literal"),
        pytest.param("snake_case_name", r"snake\_case\_name", id="intraword-underscore-literal"),
        pytest.param("**unclosed bold", r"\*\*unclosed bold", id="unclosed-bold"),
        pytest.param("```python\nno end", "\\`\\`\\`python\nno end", id="unclosed-code-block"),
        pytest.param("`", r"\`", id="lone-backtick"),
        pytest.param("**a _b** c_", r"*a \_b* c\_", id="crossed-spans"),
        pytest.param(r"\*literal\*", r"\*literal\*", id="markdown-escape-kept"),
        pytest.param("C:\\Users\\me", r"C:\\Users\\me", id="backslash-literal"),
        pytest.param("[link](http://x.y)", r"\[link\]\(http://x\.y\)", id="link-escaped"),
        pytest.param("> quote\n# title", "\\> quote\n\\# title", id="block-syntax-escaped"),
        pytest.param(
            "~~gone~~ ||hidden||", r"\~\~gone\~\~ \|\|hidden\|\|", id="discord-only-escaped"
        ),
        pytest.param("` `", r"\` \`", id="whitespace-only-code-kept-literal"),
        pytest.param("", "", id="empty"),
    ],
)
def test_to_markdown_v2_cases(text: str, expected: str) -> None:
    rendered = to_markdown_v2(text)

    assert rendered == expected
    parse_markdown_v2(rendered)


@pytest.mark.parametrize(
    "rendered",
    [
        pytest.param("a.b", id="unescaped-dot"),
        pytest.param("*bold", id="unclosed-bold"),
        pytest.param("*a _b* c_", id="overlapping"),
        pytest.param("_a__b_", id="underline-greedy"),
        pytest.param("*`code`*", id="code-inside-bold"),
        pytest.param("```py\na`b```", id="backtick-inside-pre"),
        pytest.param("```code```", id="pre-without-line-break"),
        pytest.param("trailing\\", id="trailing-backslash"),
        pytest.param("\\é", id="escape-beyond-ascii"),
    ],
)
def test_validator_rejects_invalid(rendered: str) -> None:
    with pytest.raises(MarkdownV2Error):
        parse_markdown_v2(rendered)


def is_subsequence(candidate: str, text: str) -> bool:
    remaining = iter(text)
    return all(char in remaining for char in candidate)


@PROPERTY_SETTINGS
@given(text=reply_texts)
def test_to_markdown_v2_always_valid(text: str) -> None:
    """Any input renders to valid MarkdownV2 that shows a subsequence of the input."""
    plain_text = parse_markdown_v2(to_markdown_v2(text))

    assert is_subsequence(plain_text, text)
    if not set(text) & set("*_`\\"):
        assert plain_text == text


def keeps_delimiters_apart(text: str, delimiter: str) -> bool:
    """Whether ``delimiter`` stays its own grapheme cluster on both sides of ``text``."""
    return (
        regex.match(r"\X", delimiter + text).group() == delimiter
        and regex.findall(r"\X", text + delimiter)[-1] == delimiter
    )


PLAIN_WORDS = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="*_`\\"), min_size=1, max_size=8
).filter(lambda word: word == word.strip() and keeps_delimiters_apart(word, "*"))
CODE_TEXT = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="`"), min_size=1, max_size=10
).filter(lambda code: keeps_delimiters_apart(code, "`"))


@st.composite
def simple_markdown(draw: st.DrawFn) -> tuple[str, str]:
    """Draw a reply built from known constructs, with the text Telegram should show for it."""
    written, plain_text = [], []
    for _ in range(draw(st.integers(1, 8))):
        word = draw(PLAIN_WORDS)
        kind = draw(st.sampled_from(["plain", "bold", "italic*", "italic_", "code", "block"]))
        if kind == "plain":
            written.append(word)
            plain_text.append(word)
        elif kind == "bold":
            written.append(f"**{word}**")
            plain_text.append(word)
        elif kind == "italic*":
            written.append(f"*{word}*")
            plain_text.append(word)
        elif kind == "italic_":
            written.append(f"_{word}_")
            plain_text.append(word)
        elif kind == "code":
            code = draw(CODE_TEXT)
            written.append(f"`{code}`")
            plain_text.append(code)
        else:
            code = draw(CODE_TEXT)
            written.append(f"\n```python\n{code}\n```\n")
            plain_text.append(f"\n{code}\n\n")
    return " ".join(written), " ".join(plain_text)


@PROPERTY_SETTINGS
@given(case=simple_markdown())
def test_to_markdown_v2_shows_text_without_markup(case: tuple[str, str]) -> None:
    written, plain_text = case

    assert parse_markdown_v2(to_markdown_v2(written)) == plain_text


@PROPERTY_SETTINGS
@given(text=long_reply_texts, data=st.data())
def test_telegram_chunks_render_within_limit(text: str, data: st.DataObject) -> None:
    """Split with BASIC balancing, then render: each chunk is valid and shows at most the limit."""
    limit = draw_limit(data, text, 128, utf16_length)

    for chunk in split_message(text, limit, markdown=MarkdownFlavor.BASIC):
        plain_text = parse_markdown_v2(to_markdown_v2(chunk))

        assert utf16_length(plain_text) <= limit
        assert plain_text.strip()
