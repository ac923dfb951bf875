"""Render model replies for chat platforms: split them to a limit, convert them to MarkdownV2.

Telegram accepts at most 4096 characters per message, counted in UTF-16 code units after
entity parsing. Discord accepts 2000 characters of content. `split_message` cuts a reply
into chunks within such a limit without cutting a grapheme cluster and, when asked, keeps
code blocks and inline Markdown spans balanced in every chunk. `to_markdown_v2` turns the
common Markdown a model writes into Telegram's MarkdownV2 and escapes everything else, so
that any input gives text that follows the Bot API's MarkdownV2 rules.
"""

from __future__ import annotations

import enum
import re
import string
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate, pairwise
from typing import NamedTuple

import regex

__all__ = [
    "ChunkParts",
    "MarkdownFlavor",
    "escape_markdown_v2",
    "split_message",
    "split_message_parts",
    "to_markdown_v2",
    "utf16_length",
]


def utf16_length(text: str) -> int:
    """Return the length of ``text`` in UTF-16 code units (2 for a code point above U+FFFF)."""
    # surrogatepass: a lone surrogate in a Python string counts as the one code unit it is.
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


_GRAPHEME_CLUSTER = regex.compile(r"\X")


def _segment(text: str) -> tuple[list[str], list[int]]:
    """Split ``text`` into extended grapheme clusters.

    Return the clusters and their start offsets, followed by len(text).
    """
    clusters = _GRAPHEME_CLUSTER.findall(text)
    return clusters, list(accumulate(map(len, clusters), initial=0))


# Markdown parsing


class MarkdownFlavor(enum.Enum):
    """The Markdown syntax that `split_message` keeps balanced in every chunk."""

    BASIC = "basic"
    """Code blocks, inline code, **bold** or __bold__, *italic* or _italic_.

    This is the syntax that `to_markdown_v2` converts.
    """

    DISCORD = "discord"
    """Discord's syntax: BASIC with __ as underline, plus ~~strikethrough~~ and ||spoiler||."""


# Delimiter lengths that form emphasis spans, per delimiter character, longest first.
_EMPHASIS_LENGTHS: dict[MarkdownFlavor, dict[str, tuple[int, ...]]] = {
    MarkdownFlavor.BASIC: {"*": (2, 1), "_": (2, 1)},
    MarkdownFlavor.DISCORD: {"*": (2, 1), "_": (2, 1), "~": (2,), "|": (2,)},
}

# Longer backtick runs are literal text. The caps bound the width of a code block's opening
# line (66) and of the markup that reopening it adds to a chunk: 16 backticks, 32 tag
# characters and a line break.
_MAX_BACKTICK_RUN = 16
_CODE_BLOCK_INFO = re.compile(r"([A-Za-z0-9_+#.-]{0,32})[ \t]{0,16}(?:\r\n|\n)")

_ASCII_PUNCTUATION = frozenset(string.punctuation)


class _PairKind(enum.Enum):
    EMPHASIS = "emphasis"
    CODE_SPAN = "code span"
    CODE_BLOCK = "code block"


class _Role(enum.Enum):
    OPEN = "open"
    CLOSE = "close"
    ESCAPE = "escape"


@dataclass(frozen=True, slots=True)
class _Pair:
    """A matched opening and closing delimiter. Positions are grapheme cluster indices."""

    kind: _PairKind
    delimiter: str  # the opening delimiter as written: "**", "_", or a run of backticks
    tag: str  # the language tag of a code block, else ""
    open_start: int
    open_end: int
    close_start: int
    close_end: int

    @property
    def reopening(self) -> str:
        if self.kind is _PairKind.CODE_BLOCK:
            return f"{self.delimiter}{self.tag}\n"
        return self.delimiter

    @property
    def closing(self) -> str:
        if self.kind is _PairKind.CODE_BLOCK:
            return f"\n{self.delimiter}"
        return self.delimiter


@dataclass(slots=True)
class _Markup:
    pairs: list[_Pair]
    # First cluster of each delimiter or escape -> (cluster after it, role, index in pairs or -1).
    atoms: dict[int, tuple[int, _Role, int]]


@dataclass(slots=True)
class _OpenDelimiter:
    delimiter: str
    start: int
    end: int


class _MarkupParser:
    """Find code blocks, code spans, emphasis spans and backslash escapes, left to right.

    The rules simplify CommonMark:

    - A run of 3 to 16 backticks followed by an optional language tag and a line break opens
      a code block, closed by the next run of at least as many backticks. Otherwise a run of
      up to 16 backticks opens a code span, closed by the next run of exactly that length.
      Nothing inside code is parsed. A run with no closing run is literal text.
    - A backslash before ASCII punctuation outside code makes that character literal.
    - An emphasis delimiter opens when followed by non-whitespace and closes when preceded by
      non-whitespace. ``_`` and ``__`` also do not open or close inside a word (snake_case).
      A closing delimiter matches the nearest open one of its kind; delimiters opened after
      that one stay literal, so spans always nest. A delimiter that is already open closes
      instead of opening again, so the same kind never nests in itself.

    Delimiters are whole grapheme clusters: ``*`` followed by a combining mark is text.

    NOTE: Discord's own parser is not published as a specification. Where it pairs
    delimiters differently (unusual runs like "***" or intraword "_"), a balanced chunk can
    still render differently from the whole message.
    """

    def __init__(self, text: str, clusters: list[str], offsets: list[int], flavor: MarkdownFlavor):
        self._text = text
        self._clusters = clusters
        self._offsets = offsets
        self._emphasis = _EMPHASIS_LENGTHS[flavor]
        self._pairs: list[_Pair] = []
        self._atoms: dict[int, tuple[int, _Role, int]] = {}
        self._open: list[_OpenDelimiter] = []
        self._index_backtick_runs()

    def parse(self) -> _Markup:
        clusters = self._clusters
        count = len(clusters)
        i = 0
        while i < count:
            cluster = clusters[i]
            if cluster == "\\" and i + 1 < count and clusters[i + 1] in _ASCII_PUNCTUATION:
                self._atoms[i] = (i + 2, _Role.ESCAPE, -1)
                i += 2
            elif cluster == "`":
                i = self._parse_backticks(i)
            elif cluster in self._emphasis:
                i = self._parse_emphasis_run(i)
            else:
                i += 1
        return _Markup(self._pairs, self._atoms)

    def _index_backtick_runs(self) -> None:
        """Record every maximal run of backtick clusters, for the closing-run searches."""
        clusters = self._clusters
        self._run_starts: list[int] = []
        self._run_lengths: list[int] = []
        self._run_starts_by_length: dict[int, list[int]] = {}
        i = 0
        while i < len(clusters):
            if clusters[i] != "`":
                i += 1
                continue
            end = i
            while end < len(clusters) and clusters[end] == "`":
                end += 1
            self._run_starts.append(i)
            self._run_lengths.append(end - i)
            self._run_starts_by_length.setdefault(end - i, []).append(i)
            i = end
        # Maximum run length from each run onwards, so a failed code block search costs O(1).
        self._longest_run_after = list(accumulate(reversed(self._run_lengths), max))[::-1]

    def _parse_backticks(self, start: int) -> int:
        clusters = self._clusters
        end = start
        while end < len(clusters) and clusters[end] == "`":
            end += 1
        length = end - start
        if length > _MAX_BACKTICK_RUN:
            return end
        if length >= 3:
            info = _CODE_BLOCK_INFO.match(self._text, self._offsets[end])
            if info:
                content_start = bisect_left(self._offsets, info.end())
                closing = self._find_run_at_least(length, content_start)
                if closing is not None:
                    close_start, close_length = closing
                    self._add_pair(
                        _Pair(
                            _PairKind.CODE_BLOCK,
                            "`" * length,
                            info.group(1),
                            start,
                            content_start,
                            close_start,
                            close_start + close_length,
                        )
                    )
                    return close_start + close_length
        close_start = self._find_run_exactly(length, end)
        if close_start is None:
            return end
        self._add_pair(
            _Pair(
                _PairKind.CODE_SPAN, "`" * length, "", start, end, close_start, close_start + length
            )
        )
        return close_start + length

    def _find_run_at_least(self, length: int, after: int) -> tuple[int, int] | None:
        k = bisect_left(self._run_starts, after)
        while k < len(self._run_starts) and self._longest_run_after[k] >= length:
            if self._run_lengths[k] >= length:
                return self._run_starts[k], self._run_lengths[k]
            k += 1
        return None

    def _find_run_exactly(self, length: int, after: int) -> int | None:
        starts = self._run_starts_by_length.get(length, [])
        k = bisect_left(starts, after)
        return starts[k] if k < len(starts) else None

    def _parse_emphasis_run(self, start: int) -> int:
        clusters = self._clusters
        char = clusters[start]
        end = start
        while end < len(clusters) and clusters[end] == char:
            end += 1
        before = clusters[start - 1] if start > 0 else None
        after = clusters[end] if end < len(clusters) else None
        can_open = after is not None and not after.isspace()
        can_close = before is not None and not before.isspace()
        if char == "_":
            can_open = can_open and not (before is not None and before[0].isalnum())
            can_close = can_close and not (after is not None and after[0].isalnum())

        position = start
        if can_close:
            position = self._close_emphasis(char, position, end)
        if can_open:
            for length in self._emphasis[char]:
                delimiter = char * length
                is_open = any(entry.delimiter == delimiter for entry in self._open)
                if position + length <= end and not is_open:
                    self._open.append(_OpenDelimiter(delimiter, position, position + length))
                    position += length
        return end

    def _close_emphasis(self, char: str, position: int, end: int) -> int:
        """Close open spans with the run's delimiters, innermost first.

        Return the index of the first cluster of the run left unused.
        """
        while position < end:
            depth = next(
                (
                    depth
                    for depth in range(len(self._open) - 1, -1, -1)
                    if self._open[depth].delimiter[0] == char
                    and len(self._open[depth].delimiter) <= end - position
                ),
                None,
            )
            if depth is None:
                break
            opening = self._open[depth]
            del self._open[depth:]
            closing_end = position + len(opening.delimiter)
            self._add_pair(
                _Pair(
                    _PairKind.EMPHASIS,
                    opening.delimiter,
                    "",
                    opening.start,
                    opening.end,
                    position,
                    closing_end,
                )
            )
            position = closing_end
        return position

    def _add_pair(self, pair: _Pair) -> None:
        index = len(self._pairs)
        self._pairs.append(pair)
        self._atoms[pair.open_start] = (pair.open_end, _Role.OPEN, index)
        self._atoms[pair.close_start] = (pair.close_end, _Role.CLOSE, index)


def _parse_markup(
    text: str, clusters: list[str], offsets: list[int], flavor: MarkdownFlavor
) -> _Markup:
    return _MarkupParser(text, clusters, offsets, flavor).parse()


# Splitting


class ChunkParts(NamedTuple):
    """One chunk of a split message, with the markup that balancing added kept apart."""

    reopened: str
    """Delimiters that reopen the code block and spans left open by the previous chunk."""
    body: str
    """The text taken from the message: a substring of it."""
    closed: str
    """Delimiters that close the code block and spans still open at the end of the body."""

    @property
    def text(self) -> str:
        return self.reopened + self.body + self.closed


# Boundary levels, from the least to the most preferred place to split. 0: never split here.
_GRAPHEME, _WORD, _SENTENCE, _LINE, _PARAGRAPH = 1, 2, 3, 4, 5

# The characters str.splitlines() breaks on.
_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
# ". ! ?" end a sentence only before whitespace ("3.14", "e.g.x" are not ends).
_SPACED_SENTENCE_ENDS = frozenset(".!?")
# Chinese and Japanese sentence ends, the ideographic and full-width forms included. They
# need no following space. "…" ends a sentence in both scripts.
_GLUED_SENTENCE_ENDS = frozenset("。｡．！？；…‼⁇⁈⁉")
# Ideographic comma and full-width comma and colon: word-level split points in text without spaces.
_CLAUSE_ENDS = frozenset("，、：")
# Closing quotes and brackets that stay with the sentence end before them.
_CLOSING_PUNCTUATION = frozenset("\"')]}»”’」』）】〉》")
# Characters whose meaning a reopened or closed delimiter next to them could change.
_MARKUP_CHARACTERS = frozenset("*_~|`\\")


def split_message(
    text: str,
    limit: int,
    *,
    measure: Callable[[str], int] = utf16_length,
    markdown: MarkdownFlavor | None = None,
) -> list[str]:
    """Split a reply into chunks that each measure at most ``limit``.

    Telegram: ``split_message(text, 4096)`` (UTF-16 code units, the default ``measure``, are
    never fewer than characters), with ``markdown=MarkdownFlavor.BASIC`` when the chunks go
    through `to_markdown_v2`. Discord: ``split_message(text, 2000, measure=len,
    markdown=MarkdownFlavor.DISCORD)``.

    A text that fits comes back unchanged as one chunk. Empty or whitespace-only text gives
    []. Otherwise each chunk ends at the last place within the limit of the most preferred
    kind: a blank line, then a line break, then a sentence end (". ! ?" before whitespace,
    or "。！？；…" and their full-width forms), then a space or "，、：", then any grapheme
    cluster boundary. A cluster (an emoji ZWJ sequence, a flag, a keycap, a letter with
    combining marks, a Hangul syllable in jamo) is never cut, unless that cluster alone
    exceeds the room in a chunk: then it is cut between code points.

    The whitespace at each split point is dropped, so no chunk is empty or whitespace only
    and the chunks keep all other characters in order. With ``markdown``, the indentation
    of the first line of a chunk that continues a code block is kept.

    With ``markdown``, a code block or span that a split falls inside is closed at the end
    of the chunk and reopened, with the same language tag, at the start of the next. The
    syntax is that of `MarkdownFlavor`, parsed as `_MarkupParser` describes. The added
    delimiters count against the limit. Splits next to a delimiter inside a span are
    avoided, so an added delimiter does not merge with one in the text. Measured with
    ``len`` or `utf16_length`, limits of 128 and more always leave room for the added
    delimiters.

    ``measure`` must be additive: measure(a + b) == measure(a) + measure(b), as ``len`` and
    `utf16_length` are. Each grapheme cluster is measured once, so the work is linear in the
    length of the text.

    Raises ValueError when ``limit`` is below 1, or too small to hold one code point, a
    delimiter, or the delimiters that must be closed and reopened around a chunk.
    """
    return [
        part.text for part in split_message_parts(text, limit, measure=measure, markdown=markdown)
    ]


def split_message_parts(
    text: str,
    limit: int,
    *,
    measure: Callable[[str], int] = utf16_length,
    markdown: MarkdownFlavor | None = None,
) -> list[ChunkParts]:
    """Split like `split_message`, returning each chunk with its added markup apart from its body.

    The bodies, in order, are substrings of ``text`` that together contain all of its
    non-whitespace characters. ``reopened`` and ``closed`` contain only delimiters and, for
    a code block, its language tag and a line break.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if not text or text.isspace():
        return []
    if measure(text) <= limit:
        return [ChunkParts("", text, "")]
    return _Splitter(text, limit, measure, markdown).split()


class _Splitter:
    """The units of one message and the tables that make each split an O(log n) search.

    A unit is a grapheme cluster, or a whole delimiter or backslash escape when Markdown is
    balanced. Position b is the boundary before unit b.
    """

    def __init__(
        self,
        text: str,
        limit: int,
        measure: Callable[[str], int],
        markdown: MarkdownFlavor | None,
    ):
        self._text = text
        self._limit = limit
        self._measure = measure
        self._markdown = markdown is not None

        clusters, offsets = _segment(text)
        markup = _parse_markup(text, clusters, offsets, markdown) if markdown else _Markup([], {})
        self._pairs = markup.pairs
        self._build_units(clusters, offsets, markup)
        count = len(self._units)

        self._widths = [measure(unit) for unit in self._units]
        self._prefix_width = list(accumulate(self._widths, initial=0))
        self._is_space = [unit.isspace() for unit in self._units]
        self._line_breaks = [
            sum(char in _LINE_BREAKS for char in unit) if space else 0
            for unit, space in zip(self._units, self._is_space, strict=True)
        ]
        self._next_content = self._index_next_content(count)
        self._previous_content = self._index_previous_content(count)
        self._last_line_break = list(
            accumulate((i if breaks else -1 for i, breaks in enumerate(self._line_breaks)), max)
        )

        levels = self._boundary_levels(count)
        if self._markdown:
            self._forbid_unsafe_boundaries(levels)
        # _last_at_level[k][i]: the last boundary b <= i whose level is at least k, or -1.
        self._last_at_level = {
            k: list(accumulate((b if levels[b] >= k else -1 for b in range(count + 1)), max))
            for k in range(_GRAPHEME, _PARAGRAPH + 1)
        }
        self._closing_width: dict[tuple[int, ...], int] = {}
        self._longest_closing_width: int | None = None

    # Tables

    def _build_units(self, clusters: list[str], offsets: list[int], markup: _Markup) -> None:
        self._units: list[str] = []
        self._unit_offsets: list[int] = []
        self._roles: list[tuple[_Role, int] | None] = []
        # Indices of the pairs open at each boundary, outermost first.
        self._open_pairs: list[tuple[int, ...]] = []
        open_pairs: tuple[int, ...] = ()
        i = 0
        while i < len(clusters):
            atom = markup.atoms.get(i)
            end = i + 1 if atom is None else atom[0]
            self._unit_offsets.append(offsets[i])
            self._units.append(self._text[offsets[i] : offsets[end]])
            self._open_pairs.append(open_pairs)
            self._roles.append(None if atom is None else (atom[1], atom[2]))
            if atom is not None and atom[1] is _Role.OPEN:
                open_pairs = (*open_pairs, atom[2])
            elif atom is not None and atom[1] is _Role.CLOSE:
                open_pairs = open_pairs[:-1]
            i = end
        self._unit_offsets.append(len(self._text))
        self._open_pairs.append(open_pairs)

    def _index_next_content(self, count: int) -> list[int]:
        """Return, per boundary, the first non-whitespace unit at or after it (count if none)."""
        result = [count] * (count + 1)
        for i in range(count - 1, -1, -1):
            result[i] = result[i + 1] if self._is_space[i] else i
        return result

    def _index_previous_content(self, count: int) -> list[int]:
        """Return, for each boundary, the last non-whitespace unit before it (-1 if none)."""
        result = [-1] * (count + 1)
        for i in range(count):
            result[i + 1] = result[i] if self._is_space[i] else i
        return result

    def _boundary_levels(self, count: int) -> list[int]:
        levels = [_GRAPHEME] * (count + 1)
        levels[0] = levels[count] = 0
        is_space = self._is_space
        i = 0
        while i < count:
            if not is_space[i]:
                if i + 1 < count and not is_space[i + 1]:
                    levels[i + 1] = self._level_between_content(i)
                i += 1
                continue
            end = i
            line_breaks = 0
            while end < count and is_space[end]:
                line_breaks += self._line_breaks[end]
                end += 1
            if i > 0:
                # A split at the start of a whitespace run drops the whole run.
                if line_breaks >= 2:
                    levels[i] = _PARAGRAPH
                elif line_breaks == 1:
                    levels[i] = _LINE
                elif self._ends_sentence(i - 1, spaced=True):
                    levels[i] = _SENTENCE
                else:
                    levels[i] = _WORD
            i = end
        return levels

    def _level_between_content(self, left: int) -> int:
        """Return the level of the boundary between two adjacent non-whitespace units."""
        right = self._units[left + 1]
        if right in _CLOSING_PUNCTUATION or right in _GLUED_SENTENCE_ENDS:
            return _GRAPHEME
        if self._ends_sentence(left, spaced=False):
            return _SENTENCE
        if self._units[left] in _CLAUSE_ENDS:
            return _WORD
        return _GRAPHEME

    def _ends_sentence(self, unit: int, *, spaced: bool) -> bool:
        i = unit
        while i >= 0 and unit - i < 3 and self._units[i] in _CLOSING_PUNCTUATION:
            i -= 1
        if i < 0:
            return False
        last = self._units[i]
        return last in _GLUED_SENTENCE_ENDS or (spaced and last in _SPACED_SENTENCE_ENDS)

    def _forbid_unsafe_boundaries(self, levels: list[int]) -> None:
        """Set level 0 where balancing a split would change or empty the markup around it.

        Inside a code block, a split right after its opening or right before its closing
        would leave an empty block. Inside a span, a reopened or closed delimiter next to a
        markup character could merge with it ("*" + "**b" reads as "***b"). And reopening
        "*" right before "**" writes "***", which opens "**" first.
        """
        for b in range(1, len(self._units)):
            open_pairs = self._open_pairs[b]
            if not open_pairs:
                continue
            delimiters = [self._pairs[index].delimiter for index in open_pairs]
            if any(
                outer[0] == inner[0] and len(outer) < len(inner)
                for outer, inner in pairwise(delimiters)
            ):
                levels[b] = 0
                continue
            innermost = self._pairs[open_pairs[-1]]
            # Both indices are in range: an open pair has its opening before b, its closing after.
            before = self._previous_content[b]
            after = self._next_content[b]
            if innermost.kind is _PairKind.CODE_BLOCK:
                if self._roles[before] == (_Role.OPEN, open_pairs[-1]) or (
                    self._roles[after] == (_Role.CLOSE, open_pairs[-1])
                ):
                    levels[b] = 0
                continue
            guarded = {"`"} if innermost.kind is _PairKind.CODE_SPAN else _MARKUP_CHARACTERS
            if any(char in guarded for char in self._units[before] + self._units[after]):
                levels[b] = 0

    # Splitting

    def split(self) -> list[ChunkParts]:
        count = len(self._units)
        prefix_width = self._prefix_width
        chunks: list[ChunkParts] = []
        start = 0
        while True:
            content = self._next_content[start]
            if content >= count:
                return chunks
            reopened = self._reopening(start)
            budget = self._limit - self._measure(reopened)
            closing_after_first = self._closing_of(content + 1)
            if prefix_width[content + 1] - prefix_width[start] + closing_after_first > budget:
                start = content  # drop indentation that leaves no room for the first unit
            if prefix_width[content + 1] - prefix_width[start] + closing_after_first > budget:
                chunks.extend(self._cut_unit(content, reopened, budget))
                start = self._next_start(content + 1)
                continue
            if prefix_width[count] - prefix_width[start] <= budget:
                chunks.append(ChunkParts(reopened, self._slice(start, count), ""))
                return chunks
            end = self._fit_boundary(start, content, budget)
            body_end = self._previous_content[end] + 1
            closed = "".join(self._pairs[i].closing for i in reversed(self._open_pairs[end]))
            chunks.append(ChunkParts(reopened, self._slice(start, body_end), closed))
            start = self._next_start(end)

    def _fit_boundary(self, start: int, content: int, budget: int) -> int:
        """Return the best boundary b > content where units[start:b] and its closing fit."""
        prefix_width = self._prefix_width
        room = budget
        for attempt in range(4):
            last = bisect_right(prefix_width, prefix_width[start] + room) - 1
            if last <= content:
                return content + 1  # the caller checked that the first unit fits with its closing
            boundary = self._best_boundary(content, last)
            closing = self._closing_of(boundary)
            if prefix_width[boundary] - prefix_width[start] + closing <= budget:
                return boundary
            # Leave room for this boundary's closing delimiters. The last attempt leaves room
            # for the longest closing in the message, so any boundary it finds fits.
            room = budget - (closing if attempt < 2 else self._longest_closing())
        raise AssertionError("unreachable: the last attempt reserves the longest closing")

    def _best_boundary(self, low: int, high: int) -> int:
        """Return the last boundary in (low, high] of the most preferred level present."""
        for level in range(_PARAGRAPH, _GRAPHEME - 1, -1):
            boundary = self._last_at_level[level][high]
            if boundary > low:
                return boundary
        # NOTE: every boundary in the window is unsafe for the markup around it, as inside
        # "*italic **bold** italic*" when the bold part is longer than the limit. The split
        # then goes at the window's end, and the chunk may render differently.
        return high

    def _next_start(self, boundary: int) -> int:
        """Return the unit after the whitespace at a split, keeping code indentation."""
        content = self._next_content[boundary]
        open_pairs = self._open_pairs[boundary]
        if content < len(self._units) and open_pairs:
            if self._pairs[open_pairs[-1]].kind is _PairKind.CODE_BLOCK:
                line_break = self._last_line_break[content - 1]
                if line_break >= boundary:
                    return line_break + 1
        return content

    def _cut_unit(self, unit: int, reopened: str, budget: int) -> list[ChunkParts]:
        """Cut a unit too wide for a chunk into pieces between code points."""
        if self._roles[unit] is not None:
            raise ValueError(
                f"limit {self._limit} is too small for the Markdown delimiter "
                f"{self._units[unit]!r} and the delimiters around it; use a limit of 128 or more"
            )
        closed = "".join(self._pairs[i].closing for i in reversed(self._open_pairs[unit]))
        room = budget - self._measure(closed)
        pieces: list[ChunkParts] = []
        piece: list[str] = []
        piece_width = 0
        for char in self._units[unit]:
            width = self._measure(char)
            if width > room:
                raise ValueError(
                    f"limit {self._limit} is too small for the character {char!r} "
                    f"and the delimiters around it; use a larger limit"
                )
            if piece_width + width > room:
                pieces.append(ChunkParts(reopened, "".join(piece), closed))
                piece, piece_width = [], 0
            piece.append(char)
            piece_width += width
        pieces.append(ChunkParts(reopened, "".join(piece), closed))
        # A whitespace-only piece lies at a split point, so it is dropped like whitespace there.
        return [part for part in pieces if not part.body.isspace()]

    def _reopening(self, boundary: int) -> str:
        return "".join(self._pairs[i].reopening for i in self._open_pairs[boundary])

    def _closing_of(self, boundary: int) -> int:
        open_pairs = self._open_pairs[boundary]
        width = self._closing_width.get(open_pairs)
        if width is None:
            width = self._measure("".join(self._pairs[i].closing for i in open_pairs))
            self._closing_width[open_pairs] = width
        return width

    def _longest_closing(self) -> int:
        if self._longest_closing_width is None:
            self._longest_closing_width = max(map(self._closing_of, range(len(self._units) + 1)))
        return self._longest_closing_width

    def _slice(self, start: int, end: int) -> str:
        return self._text[self._unit_offsets[start] : self._unit_offsets[end]]


# Telegram MarkdownV2

# The Bot API's "MarkdownV2 style" rules: outside entities these characters must be escaped
# with a preceding backslash. Inside pre and code entities only "`" and "\" must be.
_MARKDOWN_V2_SPECIAL = "_*[]()~`>#+-=|{}.!\\"
_MARKDOWN_V2_ESCAPES = str.maketrans({char: "\\" + char for char in _MARKDOWN_V2_SPECIAL})
_MARKDOWN_V2_CODE_ESCAPES = str.maketrans({"`": "\\`", "\\": "\\\\"})

_BOLD, _ITALIC = "*", "_"


def escape_markdown_v2(text: str) -> str:
    """Escape ``text`` so that Telegram's MarkdownV2 shows it literally, outside any entity."""
    return text.translate(_MARKDOWN_V2_ESCAPES)


def to_markdown_v2(text: str) -> str:
    """Convert a reply's common Markdown to Telegram MarkdownV2, escaping everything else.

    Converted, with the rules of `MarkdownFlavor.BASIC`: fenced code blocks with their
    language tag (pre), inline code (code), **bold** and __bold__ (bold), *italic* and
    _italic_ (italic), and backslash escapes. Every other character, unmatched or crossed
    delimiters included, is escaped and shows as written. Bold or italic text that contains
    code is closed before the code and reopened after it. The Bot API's nesting rule, read
    strictly, keeps pre and code out of other entities.

    The text Telegram shows is ``text`` without the consumed markup: the matched delimiters,
    a code block's opening line and closing backticks, and the backslash of each escape. So
    it never measures more than ``text``. If that shown text would be whitespace only, the
    whole of ``text`` is escaped and shown as written instead.
    """
    if not text:
        return ""
    clusters, offsets = _segment(text)
    markup = _parse_markup(text, clusters, offsets, MarkdownFlavor.BASIC)
    writer = _MarkdownV2Writer()
    bold = italic = 0
    i = 0
    while i < len(clusters):
        atom = markup.atoms.get(i)
        if atom is None:
            writer.add_text(clusters[i], bold > 0, italic > 0)
            i += 1
            continue
        end, role, index = atom
        if role is _Role.ESCAPE:
            writer.add_text(clusters[i + 1], bold > 0, italic > 0)
            i = end
            continue
        pair = markup.pairs[index]
        if pair.kind is _PairKind.EMPHASIS:
            step = 1 if role is _Role.OPEN else -1
            if len(pair.delimiter) == 2:
                bold += step
            else:
                italic += step
            i = end
            continue
        content = text[offsets[pair.open_end] : offsets[pair.close_start]]
        writer.add_code(content, pair.tag if pair.kind is _PairKind.CODE_BLOCK else None)
        i = pair.close_end
    rendered = writer.finish()
    return rendered if writer.has_visible_text else escape_markdown_v2(text)


class _MarkdownV2Writer:
    """Write text runs and code as MarkdownV2, opening and closing bold and italic as needed.

    Runs with the same style merge before they are written, so an italic entity never ends
    right where another begins: "_a__b_" would read as underline, because Telegram takes
    "__" as an underline delimiter first.
    """

    def __init__(self) -> None:
        self._output: list[str] = []
        self._entities: list[str] = []  # open bold and italic delimiters, outermost first
        self._run: list[str] = []
        self._run_style: tuple[bool, bool] = (False, False)
        self.has_visible_text = False

    def add_text(self, text: str, bold: bool, italic: bool) -> None:
        if (bold, italic) != self._run_style:
            self._flush_run()
            self._run_style = (bold, italic)
        self._run.append(text)

    def add_code(self, content: str, tag: str | None) -> None:
        """Write a pre entity with language ``tag``, or a code entity when ``tag`` is None."""
        self._flush_run()
        self._set_style((False, False))
        escaped = content.translate(_MARKDOWN_V2_CODE_ESCAPES)
        if tag is None:
            self._output.append(f"`{escaped}`")
        else:
            # The first line after ``` is the language, so the content starts on the next one.
            self._output.append(f"```{tag}\n{escaped}```")
        self.has_visible_text = self.has_visible_text or bool(content.strip())

    def finish(self) -> str:
        self._flush_run()
        self._set_style((False, False))
        return "".join(self._output)

    def _flush_run(self) -> None:
        if not self._run:
            return
        run = "".join(self._run)
        self._run.clear()
        self._set_style(self._run_style)
        self._output.append(escape_markdown_v2(run))
        self.has_visible_text = self.has_visible_text or bool(run.strip())

    def _set_style(self, style: tuple[bool, bool]) -> None:
        target = [delimiter for delimiter, on in zip((_BOLD, _ITALIC), style, strict=True) if on]
        # Close from the innermost until every open entity is in the target, so entities nest.
        while any(delimiter not in target for delimiter in self._entities):
            self._output.append(self._entities.pop())
        for delimiter in target:
            if delimiter not in self._entities:
                self._entities.append(delimiter)
                self._output.append(delimiter)
