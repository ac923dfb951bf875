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

_JSON_OBJECT = re.compile(r"\{[^{}]*\}")


class LlmRiskClassifier:
    """Ask a generator to rate the newest user turn; None when it fails or returns no level."""

    def __init__(self, generator: Generator, *, timeout_s: float) -> None:
        self._generator = generator
        self._timeout_s = timeout_s
        self._sampling = SamplingParams(max_new_tokens=24, temperature=0.0, top_p=1.0)

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


def parse_level(answer: str) -> RiskLevel | None:
    """Read the level from the classifier's answer: JSON first, else a bare level word."""
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
    _LOGGER.warning("Risk classifier answered without a level: %.80r", answer)
    return None
