"""Reply screening: a generated reply that could hurt is replaced before it is sent.

A reply fails when it gives or hints at a method or means of self-harm, urges
or approves of self-harm, claims to be a human or a licensed professional, or
brushes off a user who is at risk. The patterns live in
config/safety/reply_rules.yaml and are matched against the same normalised
text as risk screening.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.errors import ConfigError
from core.safety.normalize import normalize_for_screening
from core.safety.screening import compile_pattern


@dataclass(frozen=True, slots=True)
class ReplyVerdict:
    unsafe: bool
    # Categories of the rules the reply broke: method, encouragement, claims_human...
    categories: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _ReplyRule:
    category: str
    pattern: re.Pattern[str]
    # Rules such as dismissing a crisis only apply when the user is at risk.
    only_at_risk: bool


class ReplyScreener:
    """Check generated replies against the reply rules; pure Python, no I/O after loading."""

    def __init__(
        self,
        rules: list[_ReplyRule],
        exclusions: list[re.Pattern[str]],
        negation: re.Pattern[str],
    ) -> None:
        self._rules = rules
        self._exclusions = exclusions
        self._negation = negation

    @classmethod
    def load(cls, path: Path) -> ReplyScreener:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(
                f"Cannot read the reply rules {str(path)!r}: {exc.strerror}"
            ) from None
        try:
            return cls.from_mapping(data)
        except (KeyError, TypeError, ValueError, re.error) as exc:
            raise ConfigError(f"Invalid reply rules {str(path)!r}: {exc}") from None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ReplyScreener:
        rules = []
        for entry in data["rules"]:
            for patterns in entry["patterns"].values():
                for pattern in patterns:
                    rules.append(
                        _ReplyRule(
                            entry["category"],
                            compile_pattern(pattern),
                            bool(entry.get("only_at_risk", False)),
                        )
                    )
        exclusions = [
            compile_pattern(pattern)
            for patterns in data.get("exclusions", {}).values()
            for pattern in patterns
        ]
        negation = compile_pattern([cue for cues in data["negation"].values() for cue in cues])
        return cls(rules, exclusions, negation)

    def screen(self, reply: str, *, user_at_risk: bool) -> ReplyVerdict:
        """Check ``reply``; ``user_at_risk`` is True when the user turn screened above none."""
        text = normalize_for_screening(reply)
        excluded = [
            match.span() for pattern in self._exclusions for match in pattern.finditer(text)
        ]
        broken: list[str] = []
        for rule in self._rules:
            if rule.category in broken or (rule.only_at_risk and not user_at_risk):
                continue
            for match in rule.pattern.finditer(text):
                start, end = match.span()
                if any(low <= start and end <= high for low, high in excluded):
                    continue
                if self._negated(text, start):
                    continue
                broken.append(rule.category)
                break
        return ReplyVerdict(bool(broken), tuple(broken))

    def _negated(self, text: str, start: int) -> bool:
        before = text[max(0, start - 16) : start]
        return self._negation.search(before) is not None
