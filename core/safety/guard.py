"""Everything the conversation manager needs for safety, built from the settings in one place."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.config import CONFIG_DIR, SafetySettings, Secrets, Settings, resolve_path
from core.errors import ConfigError
from core.generation.base import DeltaCallback
from core.pseudonym import Pseudonymizer
from core.safety.classifier import LlmRiskClassifier
from core.safety.desk import SafetyDesk
from core.safety.replies import ReplyScreener, ReplyVerdict
from core.safety.resources import CrisisResources
from core.safety.screening import Lexicon, RiskAssessment, RiskLevel, RiskScreener

_LOGGER = logging.getLogger(__name__)

GUIDANCE_FILE = CONFIG_DIR / "safety" / "guidance.yaml"


@dataclass(slots=True)
class SafetyGuard:
    screener: RiskScreener
    replies: ReplyScreener
    resources: CrisisResources
    desk: SafetyDesk
    # Prompt notes per level and locale, for the model only.
    guidance: Mapping[str, Mapping[str, str]]
    classifier: LlmRiskClassifier | None = None
    classifier_from: RiskLevel = RiskLevel.NONE
    # off, at_risk or all: which replies the classifier checks after the reply rules.
    check_replies: str = "off"

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        secrets: Secrets,
        *,
        session_factory: async_sessionmaker[AsyncSession],
        pseudonyms: Pseudonymizer,
    ) -> SafetyGuard:
        safety = settings.safety
        lexicon = Lexicon.load(resolve_path(safety.lexicon))
        _LOGGER.info("Loaded risk lexicon %s (version %s)", lexicon.source, lexicon.version)
        resources = CrisisResources.load(resolve_path(safety.resources))
        for warning in resources.review_warnings():
            _LOGGER.warning("%s", warning)
        return cls(
            screener=RiskScreener(lexicon, window_turns=safety.window_turns),
            replies=ReplyScreener.load(resolve_path(safety.reply_rules)),
            resources=resources,
            desk=SafetyDesk(
                session_factory=session_factory, settings=safety, pseudonyms=pseudonyms
            ),
            guidance=load_guidance(GUIDANCE_FILE),
            classifier=_classifier(settings, secrets),
            classifier_from=RiskLevel(safety.classifier.from_level),
            check_replies=safety.classifier.check_replies,
        )

    async def assess(self, text: str, earlier_user_turns: Sequence[str]) -> RiskAssessment:
        """Screen a user turn with the lexicon, then ask the classifier when one is set up.

        The classifier can raise the level but never lower it: a lexicon
        crisis stays a crisis whatever the model returns.
        """
        lexical = self.screener.screen_turns(text, earlier_user_turns)
        if (
            self.classifier is None
            or lexical.level is RiskLevel.CRISIS
            or lexical.level < self.classifier_from
        ):
            return lexical
        opinion = await self.classifier.classify(text, earlier_user_turns)
        if opinion is not None and opinion > lexical.level:
            return dataclasses.replace(lexical, level=opinion, classifier_level=opinion)
        return dataclasses.replace(lexical, classifier_level=opinion)

    def guidance_for(self, level: RiskLevel, locale: str) -> str | None:
        notes = self.guidance.get(level.value)
        if not notes:
            return None
        return notes.get(locale) or notes.get("en")

    def screened_stream(self, forward: DeltaCallback, level: RiskLevel) -> DeltaCallback | None:
        """Wrap a streaming callback so that no unsafe text reaches the user.

        Returns None (no streaming) when the classifier will check this reply,
        because it judges the reply only once it is complete.
        """
        at_risk = level is not RiskLevel.NONE
        if self.classifier is not None and (
            self.check_replies == "all" or (self.check_replies == "at_risk" and at_risk)
        ):
            return None
        return _ScreenedStream(
            forward, lambda text: self.replies.screen(text, user_at_risk=at_risk)
        )

    async def screen_reply(self, reply: str, level: RiskLevel, user_text: str) -> ReplyVerdict:
        """Check a generated reply with the reply rules, then with the classifier when set up.

        A reply the classifier cannot judge (the request failed or its response
        held no verdict) keeps the rules' verdict.
        """
        at_risk = level is not RiskLevel.NONE
        verdict = self.replies.screen(reply, user_at_risk=at_risk)
        if verdict.unsafe or self.classifier is None or self.check_replies == "off":
            return verdict
        if self.check_replies == "at_risk" and not at_risk:
            return verdict
        categories = await self.classifier.check_reply(user_text, reply)
        if categories:
            return ReplyVerdict(True, categories)
        return verdict

    def crisis_resources(self, locale: str, hint: str | None) -> str:
        return self.resources.render(locale, hint)


class _ScreenedStream:
    """Forward streamed text only after the reply rules pass it.

    The newest ``HOLDBACK`` characters wait for more text, so a phrase that
    later tokens complete is caught before its start is shown. Once the text
    fails, nothing more is forwarded; the final reply (the safe fallback)
    replaces what was shown.
    """

    HOLDBACK = 48
    CHECK_WINDOW = 400

    def __init__(self, forward: DeltaCallback, check: Callable[[str], ReplyVerdict]) -> None:
        self._forward = forward
        self._check = check
        self._text = ""
        self._shown = 0
        self._stopped = False

    async def __call__(self, delta: str) -> None:
        if self._stopped:
            return
        self._text += delta
        # Earlier text was checked with earlier deltas, and a rule's match is far
        # shorter than the window, so only the tail needs checking again.
        if self._check(self._text[-self.CHECK_WINDOW :]).unsafe:
            self._stopped = True
            return
        end = len(self._text) - self.HOLDBACK
        if end > self._shown:
            piece, self._shown = self._text[self._shown : end], end
            await self._forward(piece)


def load_guidance(path: Path) -> dict[str, dict[str, str]]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(
            f"Cannot read the safety guidance {str(path)!r}: {exc.strerror}"
        ) from None
    return {level: dict(notes) for level, notes in data.items()}


def _classifier(settings: Settings, secrets: Secrets) -> LlmRiskClassifier | None:
    options = settings.safety.classifier
    if not options.enabled:
        return None
    from core.generation.openai_compat import OpenAICompatGenerator

    openai = settings.generator.openai
    api_key = secrets.openai_api_key.get_secret_value() if secrets.openai_api_key else None
    generator = OpenAICompatGenerator(
        base_url=options.base_url or openai.base_url,
        model=options.model or openai.model,
        context_length=openai.context_length,
        tokenizer=None,
        connect_timeout_s=openai.connect_timeout_s,
        timeout_s=options.timeout_s,
        max_retries=1,
        backoff_base_s=openai.backoff_base_s,
        backoff_max_s=openai.backoff_max_s,
        stop_markers=settings.generator.stop_markers,
        api_key=api_key or None,
    )
    return LlmRiskClassifier(generator, timeout_s=options.timeout_s)


__all__ = ["SafetyGuard", "SafetySettings"]
