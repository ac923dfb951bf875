"""A second opinion on risk from an LLM, through any generator (normally the ``openai`` one)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Sequence

from core.errors import GenerationError
from core.generation.base import ChatMessage, Generator, SamplingParams
from core.safety.screening import RiskLevel

_LOGGER = logging.getLogger(__name__)

_INSTRUCTIONS = """You screen messages sent to a mental-health support chatbot for risk.
Read the user's recent messages (oldest first) and rate the risk after the newest one:
- "crisis": someone's life or safety is in danger now or soon: intent or a plan to die or to
  seriously hurt themselves or someone else, means at hand (pills, a rope, a height, a weapon),
  a time or place chosen, goodbyes, an attempt or injury now, or immediate danger from someone.
- "elevated": worrying without plan or immediacy: wishes to die or disappear, hopelessness,
  feeling a burden, self-harm urges, past attempts, abuse, worry about a friend.
- "none": everyday distress, idioms ("this exam is killing me"), quotations, fiction, games,
  questions for study, negations ("I would never hurt myself").
Messages may be in Chinese or English. Answer with JSON only: {"level": "none|elevated|crisis"}"""

_REPLY_INSTRUCTIONS = """You check replies that a mental-health support chatbot is about to send.
The reply is unsafe when it does any of these:
- "method": gives or hints at a way, means, dose, place or combination for self-harm or suicide,
  or helps get or hide the means;
- "encouragement": agrees the user should die or hurt themselves, approves or praises it;
- "claims_human": says it is a human, a real person, a staff member or a volunteer;
- "claims_therapist": says it is a licensed therapist, psychologist, counsellor or doctor;
- "dismisses_crisis": brushes off a user who says they are in danger or at risk.
Supportive replies, referrals to hotlines or professionals, and saying it is an AI are safe.
Text may be in Chinese or English. Answer with JSON only:
{"unsafe": true|false, "categories": ["method", ...]}"""

REPLY_CATEGORIES = frozenset(
    {"method", "encouragement", "claims_human", "claims_therapist", "dismisses_crisis"}
)

_JSON_OBJECT = re.compile(r"\{[^{}]*\}")


class LlmRiskClassifier:
    """Ask a generator to rate the newest user turn; None when it fails or returns no level."""

    def __init__(self, generator: Generator, *, timeout_s: float) -> None:
        self._generator = generator
        self._timeout_s = timeout_s
        self._sampling = SamplingParams(max_new_tokens=24, temperature=0.0, top_p=1.0)
        self._reply_sampling = SamplingParams(max_new_tokens=48, temperature=0.0, top_p=1.0)

    @property
    def generator(self) -> Generator:
        return self._generator

    async def classify(self, text: str, earlier_user_turns: Sequence[str]) -> RiskLevel | None:
        numbered = [*earlier_user_turns[-5:], text]
        listing = "\n".join(f"{index}. {turn}" for index, turn in enumerate(numbered, 1))
        messages = [
            ChatMessage("system", _INSTRUCTIONS),
            ChatMessage("user", f"User messages:\n{listing}"),
        ]
        try:
            result = await asyncio.wait_for(
                self._generator.generate(messages, self._sampling), timeout=self._timeout_s
            )
        except (GenerationError, TimeoutError) as exc:
            _LOGGER.warning("Risk classifier failed: %s: %s", type(exc).__name__, exc)
            return None
        return parse_level(result.text)

    async def check_reply(self, user_text: str, reply: str) -> tuple[str, ...] | None:
        """Return the unsafe categories the model finds in ``reply`` (empty when safe).

        None when the request fails or its response cannot be read.
        """
        messages = [
            ChatMessage("system", _REPLY_INSTRUCTIONS),
            ChatMessage("user", f"User message:\n{user_text}\n\nChatbot reply:\n{reply}"),
        ]
        try:
            result = await asyncio.wait_for(
                self._generator.generate(messages, self._reply_sampling),
                timeout=self._timeout_s,
            )
        except (GenerationError, TimeoutError) as exc:
            _LOGGER.warning("Reply check failed: %s: %s", type(exc).__name__, exc)
            return None
        return parse_reply_verdict(result.text)


def parse_level(answer: str) -> RiskLevel | None:
    """Read the level from the classifier response: JSON first, else a bare level word."""
    for candidate in _JSON_OBJECT.findall(answer):
        try:
            level = json.loads(candidate).get("level")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(level, str) and level.strip().lower() in {"none", "elevated", "crisis"}:
            return RiskLevel(level.strip().lower())
    words = set(re.findall(r"[a-z]+", answer.lower()))
    found = [level for level in RiskLevel if level.value in words]
    if len(found) == 1:
        return found[0]
    # The classifier's output may quote the user's message, so it is logged at DEBUG only.
    _LOGGER.warning("Risk classifier answered without a level (%d characters)", len(answer))
    _LOGGER.debug("Risk classifier answer without a level: %.80r", answer)
    return None


def parse_reply_verdict(answer: str) -> tuple[str, ...] | None:
    """Read ``{"unsafe": bool, "categories": [...]}``; unknown categories become "other"."""
    for candidate in _JSON_OBJECT.findall(answer.replace("\n", " ")):
        try:
            data = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if not isinstance(data, dict) or not isinstance(data.get("unsafe"), bool):
            continue
        if not data["unsafe"]:
            return ()
        categories = data.get("categories") or []
        found = tuple(
            category if category in REPLY_CATEGORIES else "other"
            for category in categories
            if isinstance(category, str)
        )
        return found or ("other",)
    _LOGGER.warning("Reply check answered without a verdict (%d characters)", len(answer))
    _LOGGER.debug("Reply check answer without a verdict: %.80r", answer)
    return None
