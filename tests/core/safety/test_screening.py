"""Risk screening with the shipped lexicon: normalisation, negation, context, combinations."""

from __future__ import annotations

import pytest

from core.config import CONFIG_DIR
from core.errors import ConfigError
from core.safety.normalize import normalize_for_screening
from core.safety.screening import Lexicon, RiskLevel, RiskScreener

LEXICON = Lexicon.load(CONFIG_DIR / "safety" / "lexicon.yaml")


@pytest.fixture(scope="module")
def screener() -> RiskScreener:
    return RiskScreener(LEXICON)


@pytest.mark.parametrize(
    ("disguised", "plain"),
    [
        ("I’m gonna kill myself", "I'm gonna kill myself"),
        ("||i want to die||", "i want to die"),
        ("ｉ ｗａｎｔ ｔｏ ｄｉｅ", "i want to die"),
        ("I WANT TO DIEEEEEE", "i want to die"),
        ("k i l l myself", "kill myself"),
        ("k.i.l.l myself", "kill myself"),
        ("su1c1dal", "suicidal"),
        ("kill\u200bmyself", "killmyself"),
        ("**kill** myself", "kill myself"),
        ("想 死", "想死"),
        ("想死死死死", "想死"),
        ("“我不想活了”", '"我不想活了"'),
    ],
)
def test_normalisation_matches_plain_form(disguised: str, plain: str) -> None:
    assert normalize_for_screening(disguised) == normalize_for_screening(plain)


@pytest.mark.parametrize(
    "text",
    [
        "I’m going to kill myself tonight",
        "||I'm going to kill myself tonight||",
        "ＩＭ ＧＯＮＮＡ ＫＩＬＬ ＭＹＳＥＬＦ",
        "im gonna k i l l myself",
        "i want to k i l l m y s e l f tonight",
        "going to e n d  m y  l i f e",
        "i want to dieeeee tonight",
        "药都攒好了，今晚就走",
        "不 想 活 了",
        "想死…真的好想死",
        "I've saved up 40 sleeping pills 💊",
        "the bridge near work is high enough",
        "gave my cat to my sister, bye everyone",
        "他说今天要杀了我，现在在砸门",
        "my friend just took a whole bottle of pills and isn't answering",
    ],
)
def test_crisis_messages(screener: RiskScreener, text: str) -> None:
    assert screener.screen(text).level is RiskLevel.CRISIS


@pytest.mark.parametrize(
    "text",
    [
        "this exam is killing me",
        "I'm dying to see the new movie",
        "累死了，今天加班到十点",
        "笑死我了哈哈哈",
        "I killed the final boss last night",
        "I'm sad but I would never kill myself",
        "我没有想死，只是很累",
        "what are the warning signs of suicide? I'm training as a hotline volunteer",
        'my favourite song goes "I want to die in your arms", such a good line',
        "cutting my hair short this weekend",
        "weeds are finally dead, killed them all",
    ],
)
def test_hard_negatives(screener: RiskScreener, text: str) -> None:
    assert screener.screen(text).level is RiskLevel.NONE


@pytest.mark.parametrize(
    "text",
    [
        "sometimes I wish I could just disappear",
        "everyone would be better off without me",
        "我觉得自己是家里的累赘",
        "I want to cut myself but I haven't",
        "my friend keeps saying she wants to die",
        "my friend said she wants to kill herself",
        "I tried to end my life two years ago and lately I feel like that again",
    ],
)
def test_elevated_messages(screener: RiskScreener, text: str) -> None:
    assert screener.screen(text).level is RiskLevel.ELEVATED


def test_third_party_is_worry_not_crisis(screener: RiskScreener) -> None:
    own = screener.screen("I want to die")
    friend = screener.screen("she wants to die")

    assert own.level is RiskLevel.CRISIS
    assert friend.level is RiskLevel.ELEVATED
    assert friend.categories == {"third_party_worry"}


def test_risk_across_turns(screener: RiskScreener) -> None:
    earlier = ["I can't see any future anymore", "everything is pointless"]

    alone = screener.screen("picked up a rope from the hardware store")
    together = screener.screen_turns("picked up a rope from the hardware store", earlier)
    calm = screener.screen_turns("thanks for listening", earlier)

    assert together.level is RiskLevel.CRISIS
    assert together.across_turns or alone.level is RiskLevel.CRISIS
    assert calm.level is RiskLevel.NONE


def test_time_alone_is_no_risk(screener: RiskScreener) -> None:
    assert screener.screen("I'm so tired tonight").level is RiskLevel.NONE
    assert screener.screen_turns("see you tonight!", ["had a long day"]).level is RiskLevel.NONE


def test_summary_has_no_message_text(screener: RiskScreener) -> None:
    summary = screener.screen("I'm going to kill myself tonight").summary()

    assert summary["level"] == "crisis"
    assert "kill" not in str(summary)


def test_invalid_lexicon_names_file(tmp_path) -> None:
    broken = tmp_path / "lexicon.yaml"
    broken.write_text("terms: {en: [{category: intent, patterns: ['(unclosed']}]}\n")

    with pytest.raises(ConfigError, match="Invalid risk lexicon"):
        Lexicon.load(broken)
