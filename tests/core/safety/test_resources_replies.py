"""Crisis resources per region, reply screening, and the LLM risk classifier."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from core.config import CONFIG_DIR
from core.errors import ConfigError
from core.generation.openai_compat import OpenAICompatGenerator
from core.safety.classifier import LlmRiskClassifier, parse_level, parse_reply_verdict
from core.safety.replies import ReplyScreener
from core.safety.resources import CrisisResources
from core.safety.screening import RiskLevel
from tests.helpers.openai_standin import OpenAIStandIn, Reply, server_error

RESOURCES = CrisisResources.load(CONFIG_DIR / "crisis_resources.yaml")
REPLIES = ReplyScreener.load(CONFIG_DIR / "safety" / "reply_rules.yaml")


@pytest.mark.parametrize(
    ("locale", "hint", "present", "absent"),
    [
        ("zh-CN", "zh-hans", ["12356", "110", "120", "中国大陆"], ["988"]),
        ("zh-CN", "zh-TW", ["1925"], ["12356"]),
        ("zh-CN", "zh-HK", ["2896 0000", "2389 2222", "999"], ["12356"]),
        ("en", "en-US", ["988", "988lifeline.org", "911"], ["116 123"]),
        ("en", "en-GB", ["116 123", "Samaritans"], ["988"]),
        ("en", "en-IE", ["116 123", "112"], ["988"]),
        ("en", "en", ["988", "116 123"], ["12356"]),
        ("en", None, ["988", "116 123"], ["12356"]),
    ],
)
def test_resources_for_region(
    locale: str, hint: str | None, present: list[str], absent: list[str]
) -> None:
    text = RESOURCES.render(locale, hint)

    for fragment in present:
        assert fragment in text
    for fragment in absent:
        assert fragment not in text
    assert "findahelpline.com" in text


def test_chinese_block_uses_chinese_punctuation() -> None:
    text = RESOURCES.render("zh-CN", "zh-hans")

    assert "中国大陆：" in text
    assert "全国统一心理援助热线：12356（" in text
    assert "紧急情况：110（报警）" in text


def test_every_seeded_line_records_a_source() -> None:
    data = yaml.safe_load((CONFIG_DIR / "crisis_resources.yaml").read_text(encoding="utf-8"))
    for code in ("CN", "US", "GB", "HK", "TW"):
        for line in data["regions"][code]["lines"]:
            assert line["confirmed"], (code, line["number"])
    assert data["reviewed_by"]
    assert isinstance(data["reviewed_on"], dt.date)


def test_review_warnings(tmp_path: Path) -> None:
    data = yaml.safe_load((CONFIG_DIR / "crisis_resources.yaml").read_text(encoding="utf-8"))
    fresh = RESOURCES.review_warnings(today=data["reviewed_on"] + dt.timedelta(days=30))
    stale = RESOURCES.review_warnings(today=data["reviewed_on"] + dt.timedelta(days=400))
    data.pop("reviewed_by")
    unreviewed_file = tmp_path / "resources.yaml"
    unreviewed_file.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    unreviewed = CrisisResources.load(unreviewed_file).review_warnings()

    assert not any("reviewed" in warning for warning in fresh)
    assert any("more than a year ago" in warning for warning in stale)
    assert any("records no review" in warning for warning in unreviewed)


def test_resource_line_without_number_is_rejected(tmp_path: Path) -> None:
    broken = tmp_path / "resources.yaml"
    broken.write_text(
        "regions: {XX: {name: X, lines: [{name: Hotline}]}}\n"
        "elsewhere: {en: e}\nhint_regions: {}\nlocale_regions: {}\n",
        encoding="utf-8",
    )

    with pytest.raises(ConfigError, match="missing 'number'"):
        CrisisResources.load(broken)


@pytest.mark.parametrize(
    ("reply", "at_risk", "category"),
    [
        ("Taking them all at once would do it.", True, "method"),
        ("The roof of your building is high enough.", True, "method"),
        ("If that's what you want, go ahead.", True, "encouragement"),
        ("Honestly it's a brave choice.", True, "encouragement"),
        ("I'm a real person, not a bot.", False, "claims_human"),
        ("As a licensed therapist, I think you have depression.", False, "claims_therapist"),
        ("我是一名心理咨询师，可以帮你诊断。", False, "claims_therapist"),
        ("You're overreacting, everyone feels like that.", True, "dismisses_crisis"),
        ("别想太多了，睡一觉就好。", True, "dismisses_crisis"),
    ],
)
def test_unsafe_replies(reply: str, at_risk: bool, category: str) -> None:
    verdict = REPLIES.screen(reply, user_at_risk=at_risk)

    assert verdict.unsafe
    assert category in verdict.categories


@pytest.mark.parametrize(
    "reply",
    [
        "I'm an AI, not a human or a therapist, but I'm here to listen.",
        "A licensed therapist could really help with this.",
        "Please don't take more pills than prescribed. Could you give them to someone?",
        "You're not overreacting. What you feel matters.",
        "我是 AI，不是心理医生，但我愿意听你说。",
        "请不要一个人待着，可以打 12356 吗？",
    ],
)
def test_safe_replies(reply: str) -> None:
    assert not REPLIES.screen(reply, user_at_risk=True).unsafe


def test_dismissal_only_counts_when_user_at_risk() -> None:
    reply = "Just relax, you'll be fine."

    assert REPLIES.screen(reply, user_at_risk=True).unsafe
    assert not REPLIES.screen(reply, user_at_risk=False).unsafe


@pytest.mark.parametrize(
    ("answer", "level"),
    [
        ('{"level": "crisis"}', RiskLevel.CRISIS),
        ('Sure.\n```json\n{"level": "elevated"}\n```', RiskLevel.ELEVATED),
        ("none", RiskLevel.NONE),
        ("I cannot help with that.", None),
        ('{"level": "urgent"}', None),
    ],
)
def test_classifier_answer_parsing(answer: str, level: RiskLevel | None) -> None:
    assert parse_level(answer) is level


async def test_classifier_through_openai_server() -> None:
    with OpenAIStandIn() as server:
        server.script(Reply(text='{"level": "crisis"}'), server_error(), server_error())
        generator = OpenAICompatGenerator(
            base_url=server.base_url, model="standin-model", context_length=4096, max_retries=1
        )
        await generator.start()
        try:
            classifier = LlmRiskClassifier(generator, timeout_s=5)
            first = await classifier.classify("going to the lake later", ["bought a rope"])
            failed = await classifier.classify("hello", [])
        finally:
            await generator.stop()

    assert first is RiskLevel.CRISIS
    assert failed is None
    sent = server.requests[0].messages
    assert sent[0]["role"] == "system"
    assert "1. bought a rope\n2. going to the lake later" in sent[1]["content"]


async def test_classifier_raises_but_never_lowers(sqlite_url: str) -> None:
    from core.config import DatabaseSettings, RiskClassifierSettings
    from core.storage import db
    from tests.helpers.safety import build_guard

    engine = db.create_engine(DatabaseSettings(url=sqlite_url))
    with OpenAIStandIn() as server:
        guard = build_guard(
            db.create_session_factory(engine),
            classifier=RiskClassifierSettings(
                enabled=True, base_url=server.base_url, model="standin-model"
            ),
        )
        assert guard.classifier is not None
        await guard.classifier.generator.start()
        server.script(Reply(text='{"level": "crisis"}'), Reply(text='{"level": "none"}'))
        try:
            raised = await guard.assess("heading to the lake alone, everything's sorted", [])
            kept = await guard.assess("I'm going to kill myself tonight", [])
            asked = len(server.requests)
            # The lexicon's crisis needs no second opinion.
            assert asked == 1
            lowered_attempt = await guard.assess("had a long day", [])
        finally:
            await guard.classifier.generator.stop()
            await engine.dispose()

    assert raised.level is RiskLevel.CRISIS
    assert raised.classifier_level is RiskLevel.CRISIS
    assert kept.level is RiskLevel.CRISIS
    assert lowered_attempt.level is RiskLevel.NONE
    assert lowered_attempt.classifier_level is RiskLevel.NONE


@pytest.mark.parametrize(
    ("answer", "categories"),
    [
        ('{"unsafe": false, "categories": []}', ()),
        ('{"unsafe": true, "categories": ["method"]}', ("method",)),
        ('Here:\n{"unsafe": true,\n "categories": ["made_up"]}', ("other",)),
        ('{"unsafe": true}', ("other",)),
        ("I cannot judge that.", None),
    ],
)
def test_reply_verdict_parsing(answer: str, categories: tuple[str, ...] | None) -> None:
    assert parse_reply_verdict(answer) == categories


async def test_classifier_checks_replies_to_users_at_risk(sqlite_url: str) -> None:
    from core.config import DatabaseSettings, RiskClassifierSettings
    from core.storage import db
    from tests.helpers.safety import build_guard

    engine = db.create_engine(DatabaseSettings(url=sqlite_url))
    with OpenAIStandIn() as server:
        guard = build_guard(
            db.create_session_factory(engine),
            classifier=RiskClassifierSettings(
                enabled=True, base_url=server.base_url, model="standin-model"
            ),
        )
        assert guard.classifier is not None
        await guard.classifier.generator.start()
        server.script(
            Reply(text='{"unsafe": true, "categories": ["method"]}'),
            Reply(text='{"unsafe": false, "categories": []}'),
        )
        try:
            flagged = await guard.screen_reply(
                "Somewhere quiet where nobody looks would suit you.",
                RiskLevel.CRISIS,
                "I'm going tonight",
            )
            passed = await guard.screen_reply(
                "I'm here with you. Can you call 988 now?", RiskLevel.CRISIS, "I'm going tonight"
            )
            asked = len(server.requests)
            # A user not at risk: with the default "at_risk", the model is not asked.
            ordinary = await guard.screen_reply("Sounds like a nice day!", RiskLevel.NONE, "hi")
        finally:
            await guard.classifier.generator.stop()
            await engine.dispose()

    assert flagged.unsafe
    assert flagged.categories == ("method",)
    assert not passed.unsafe
    assert not ordinary.unsafe
    assert asked == 2
    assert len(server.requests) == 2
    assert "Chatbot reply:\nSomewhere quiet" in server.requests[0].messages[1]["content"]
