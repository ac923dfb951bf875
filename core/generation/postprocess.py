"""Reply clean-up shared by every generator: cut at chat-role markers, trim looping sentences."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Sentence ends in English and Chinese; the lookbehind keeps the punctuation with its sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?。！？…~])\s*|\n+")
_WORDS = re.compile(r"\w+", re.UNICODE)

# Markers a user might type that some chat templates or servers would read as control tokens.
_MARKER_LIKE = re.compile(r"<\|[^<>|\s]{1,40}\|>|\[[gs]?MASK\]|</?s>")


@dataclass(frozen=True, slots=True)
class CleanedReply:
    text: str
    cut_at_marker: bool
    repetition_trimmed: bool


def cut_at_markers(text: str, markers: Iterable[str]) -> tuple[str, bool]:
    """Return the text before the first chat-role marker, and whether one was found."""
    cut = len(text)
    for marker in markers:
        if not marker:
            continue
        position = text.find(marker)
        if position != -1:
            cut = min(cut, position)
    return text[:cut], cut < len(text)


def _sentence_key(sentence: str) -> str:
    words = _WORDS.findall(sentence.casefold())
    return " ".join(words) if words else sentence.strip()


def _sentences(text: str) -> list[tuple[int, str]]:
    """Split ``text`` into (start offset, sentence) pieces at sentence ends and newlines."""
    pieces = []
    position = 0
    for match in _SENTENCE_END.finditer(text):
        if match.start() > position:
            pieces.append((position, text[position : match.start()]))
        position = match.end()
    if position < len(text):
        pieces.append((position, text[position:]))
    return pieces


def trim_repetition(text: str, *, min_key_bytes: int = 5) -> tuple[str, bool]:
    """Cut a reply where the model starts looping, keeping one copy of the looping sentence.

    A loop is a sentence said again right after itself, or said three times or
    more. One sentence said twice far apart is ordinary speech and stays. Very
    short sentences ("Yes.", "OK.", the "Mr" of "Mr.") are never counted; the
    length is in UTF-8 bytes so that a three-character Chinese sentence counts.
    """
    pieces = [(start, _sentence_key(sentence)) for start, sentence in _sentences(text)]
    pieces = [(start, key) for start, key in pieces if len(key.encode("utf-8")) >= min_key_bytes]
    totals: dict[str, int] = {}
    for _, key in pieces:
        totals[key] = totals.get(key, 0) + 1

    seen: set[str] = set()
    previous = None
    for start, key in pieces:
        if key in seen and (key == previous or totals[key] >= 3):
            return text[:start].rstrip(), True
        seen.add(key)
        previous = key
    return text, False


def end_at_sentence(text: str, *, min_kept: float = 0.5) -> str:
    """Drop an unfinished last sentence, as a reply cut by the token limit has.

    The text is kept whole when no sentence end lies in its last half, so a
    reply with one long sentence is not reduced to almost nothing.
    """
    pieces = _sentences(text)
    if len(pieces) < 2:
        return text
    last_start = pieces[-1][0]
    kept = text[:last_start].rstrip()
    return kept if len(kept) >= len(text) * min_kept else text


def clean_reply(text: str, markers: Sequence[str]) -> CleanedReply:
    """Apply every clean-up step to a finished reply."""
    text, cut = cut_at_markers(text, markers)
    text, trimmed = trim_repetition(text)
    # A reply cut at the token limit can end inside a character whose bytes span two tokens,
    # and decoding its first bytes alone gives U+FFFD, the replacement character.
    text = text.strip().rstrip("\ufffd").rstrip()
    return CleanedReply(text=text, cut_at_marker=cut, repetition_trimmed=trimmed)


def defuse_markers(text: str) -> str:
    """Break marker-like strings a user typed so a server's template cannot read them as tokens.

    A zero-width space goes after the first character; the text reads the same.
    Only the ``openai`` generator needs this: the local generator encodes user
    text with special tokens switched off instead.
    """
    return _MARKER_LIKE.sub(lambda match: match.group(0)[0] + "\u200b" + match.group(0)[1:], text)


class StreamGuard:
    """Pass streamed reply text on, holding back any tail that could start a marker.

    ``feed`` returns the text that is safe to show now; once a marker appears,
    everything from it on is dropped and ``stopped`` turns true.
    """

    def __init__(self, markers: Sequence[str]) -> None:
        self._markers = [marker for marker in markers if marker]
        self._longest = max((len(marker) for marker in self._markers), default=0)
        self._buffer = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        self._buffer += delta
        text, cut = cut_at_markers(self._buffer, self._markers)
        if cut:
            self.stopped = True
            self._buffer = ""
            return text

        # Keep back the longest tail that is a prefix of some marker.
        hold = 0
        for size in range(1, min(self._longest, len(text)) + 1):
            tail = text[-size:]
            if any(marker.startswith(tail) for marker in self._markers):
                hold = size
        ready, self._buffer = text[: len(text) - hold], text[len(text) - hold :]
        return ready

    def flush(self) -> str:
        rest, self._buffer = self._buffer, ""
        return "" if self.stopped else rest
