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
# underscore: "k i l l", "k.i.l.l", "d-i-e". Two spaces mark a word boundary
# inside such a run ("e n d  m y  l i f e" -> "end my life").
_SPACED_LETTERS = re.compile(r"(?<![a-z])[a-z](?:(?: {1,2}|[._\-])[a-z]){2,}(?![a-z])")
_SPACED_SEPARATORS = re.compile(r"[ ._\-]")
# Chinese is written without spaces, so whitespace between two CJK characters is padding.
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_GAP = re.compile(rf"(?<=[{_CJK}])[\s._\-*·]+(?=[{_CJK}])")
_WHITESPACE = re.compile(r"\s+")
# Traditional characters of the words the lexicon uses, read as simplified, so a
# message from Hong Kong or Taiwan matches the same patterns. Not a full converter.
_TRADITIONAL = str.maketrans(
    "藥樓頂橋邊殺說幫東帳號碼寫書讓會發現經這個們時麼還沒對為來後裡點覺開關見給謝別難過從應該錢鐵軌車庫氣準備劃傷殘絕緒壓煩機電話結斷離媽爺醫學隨陽臺戶嗎餘帶記繩燒農戲劇語詞聽夢請問題課論員練線熱確認雙親愛懷無歲體頭臉靜靈處場邊飛萬與們讀變當盡歡樂貓養錯誰麵衝淚聲換買賣選層陽護欄監視電郵腦術轉換厭緊張擔負責傳訊鬱憂慮癥態",
    "药楼顶桥边杀说帮东账号码写书让会发现经这个们时么还没对为来后里点觉开关见给谢别难过从应该钱铁轨车库气准备划伤残绝绪压烦机电话结断离妈爷医学随阳台户吗余带记绳烧农戏剧语词听梦请问题课论员练线热确认双亲爱怀无岁体头脸静灵处场边飞万与们读变当尽欢乐猫养错谁面冲泪声换买卖选层阳护栏监视电邮脑术转换厌紧张担负责传讯郁忧虑症态",
)
# Any character repeated: "soooo" -> "so", "哈哈哈" -> "哈".
_REPEATS = re.compile(r"(.)\1+", re.DOTALL)


def squeeze(text: str) -> str:
    """Collapse every run of one repeated character to a single character."""
    return _REPEATS.sub(r"\1", text)


def normalize_for_screening(text: str, emoji: Mapping[str, str] | None = None) -> str:
    """Return ``text`` in the one spelling that the risk lexicon is written against.

    Steps: compatibility forms (full-width letters and digits become ASCII),
    case folding, common traditional characters read as simplified, ASCII
    quotes, invisible characters and Discord markup removed,
    ``emoji`` replaced by words, letter-like digits inside words read as
    letters, spaced-out letters and CJK characters joined, repeated characters
    squeezed, whitespace collapsed.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = text.translate(_TRADITIONAL)
    text = text.translate(_QUOTES)
    text = _INVISIBLE.sub("", text)
    text = _MARKUP.sub("", text)
    if emoji:
        for symbol, word in emoji.items():
            if symbol in text:
                text = text.replace(symbol, f" {word} ")
    text = _LEET_INSIDE.sub(lambda match: match.group().translate(_LEET), text)
    text = _SPACED_LETTERS.sub(_join_spaced_letters, text)
    text = _CJK_GAP.sub("", text)
    text = _WHITESPACE.sub(" ", text).strip()
    return squeeze(text)


def _join_spaced_letters(match: re.Match[str]) -> str:
    words = match.group().split("  ")
    return " ".join(_SPACED_SEPARATORS.sub("", word) for word in words)
