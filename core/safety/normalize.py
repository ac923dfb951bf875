"""Text normalisation before risk screening, so that disguised spellings match plain ones.

The screener matches its lexicon against ``normalize_for_screening(text)``, and
the lexicon's own literal patterns go through ``squeeze`` when they are
compiled, so both sides agree on one spelling.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping

# Typographic quotes and apostrophes, mapped to their ASCII forms. CJK corner
# brackets stay, because quotation detection treats them as quotes already.
_QUOTES = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201a": "'",
        "\u201b": "'",
        "\u2032": "'",
        "\u02bc": "'",
        "`": "'",
        "\u00b4": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u201f": '"',
        "\u2033": '"',
        "\u00ab": '"',
        "\u00bb": '"',
    }
)
# Zero-width and invisible format characters that split words without showing.
_INVISIBLE = re.compile("[\u00ad\u180e\u200b-\u200f\u2060-\u2064\ufeff]")
# Discord markdown around or inside words: spoiler bars, bold, italics, strike-through.
_MARKUP = re.compile(r"\|\||[*~]+")
# Digits and symbols that stand for letters inside a word ("k1ll", "d!e", "$uicide").
_LEET = str.maketrans(
    {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"}
)
# Only between letters (or "$"/"@" before a word), so "30 pills" and "help!" keep theirs.
_LEET_INSIDE = re.compile(r"(?<=[a-z])[013457@$!]+(?=[a-z])|(?<![a-z0-9])[$@](?=[a-z])")
# Runs of three or more single letters separated by one space, dot, dash or
# underscore: "k i l l", "k.i.l.l", "d-i-e".
_SPACED_LETTERS = re.compile(r"(?<![a-z])[a-z](?:[ ._\-][a-z]){2,}(?![a-z])")
_SPACED_SEPARATORS = re.compile(r"[ ._\-]")
# Chinese is written without spaces, so whitespace between two CJK characters is padding.
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_GAP = re.compile(rf"(?<=[{_CJK}])[\s._\-*·]+(?=[{_CJK}])")
_WHITESPACE = re.compile(r"\s+")
# Any character repeated: "soooo" -> "so", "哈哈哈" -> "哈".
_REPEATS = re.compile(r"(.)\1+", re.DOTALL)


def squeeze(text: str) -> str:
    """Collapse every run of one repeated character to a single character."""
    return _REPEATS.sub(r"\1", text)


def normalize_for_screening(text: str, emoji: Mapping[str, str] | None = None) -> str:
    """Return ``text`` in the one spelling that the risk lexicon is written against.

    Steps: compatibility forms (full-width letters and digits become ASCII),
    case folding, ASCII quotes, invisible characters and Discord markup removed,
    ``emoji`` replaced by words, letter-like digits inside words read as
    letters, spaced-out letters and CJK characters joined, repeated characters
    squeezed, whitespace collapsed.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = text.translate(_QUOTES)
    text = _INVISIBLE.sub("", text)
    text = _MARKUP.sub("", text)
    if emoji:
        for symbol, word in emoji.items():
            if symbol in text:
                text = text.replace(symbol, f" {word} ")
    text = _LEET_INSIDE.sub(lambda match: match.group().translate(_LEET), text)
    text = _SPACED_LETTERS.sub(lambda match: _SPACED_SEPARATORS.sub("", match.group()), text)
    text = _CJK_GAP.sub("", text)
    text = _WHITESPACE.sub(" ", text).strip()
    return squeeze(text)
