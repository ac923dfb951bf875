"""Risk screening of user turns with a lexicon of patterns: levels none, elevated and crisis.

The lexicon (config/safety/lexicon.yaml) lists patterns per language, each
with a level and a category. A match counts unless a negation shortly before
it cancels it ("I would never kill myself"), it sits inside a quotation that
names its source (a song, a book, a film), or it lies within an exclusion (an
idiom such as "this exam is killing me"). A match about someone else ("she
wants to die") counts as worry for them, not as the writer's own crisis.

Categories also combine: hopelessness with means at hand, or means with a
time, make a crisis together even when each alone does not. The combination
rules run over the newest message and over the user's recent turns, so risk
that only shows across turns is caught.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.errors import ConfigError
from core.safety.normalize import normalize_for_screening


class RiskLevel(enum.StrEnum):
    NONE = "none"
    ELEVATED = "elevated"
    CRISIS = "crisis"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, RiskLevel):
            return NotImplemented
        return self.rank >= other.rank

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, RiskLevel):
            return NotImplemented
        return self.rank > other.rank

    def __le__(self, other: object) -> bool:
        if not isinstance(other, RiskLevel):
            return NotImplemented
        return self.rank <= other.rank

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, RiskLevel):
            return NotImplemented
        return self.rank < other.rank


# Categories about another person's danger, which the writer's own past or thoughts do not change.
_OTHERS = frozenset({"harm_others", "abuse_danger", "abuse", "third_party_danger"})
# Categories that a past described as over ("clean for five years") cancels.
_RECOVERABLE = frozenset(
    {"history", "self_harm_urge", "passive_wish", "intent", "hopelessness", "burden"}
)

# Signals that are a warning sign when someone else shows them ("my brother gave his things away").
_WARNING_SIGNS = frozenset({"giving_away", "means"})

_RANKS = {RiskLevel.NONE: 0, RiskLevel.ELEVATED: 1, RiskLevel.CRISIS: 2}


def highest(levels: Iterable[RiskLevel]) -> RiskLevel:
    return max(levels, key=lambda level: level.rank, default=RiskLevel.NONE)


@dataclass(frozen=True, slots=True)
class RiskMatch:
    """One lexicon pattern found in a message."""

    lang: str
    category: str
    level: RiskLevel
    # The matched part of the normalised text.
    text: str


@dataclass(frozen=True, slots=True)
class RiskAssessment:
    level: RiskLevel
    matches: tuple[RiskMatch, ...] = ()
    # Names of the combination rules that raised the level, if any.
    rules: tuple[str, ...] = ()
    # True when the level comes from earlier turns together with this one.
    across_turns: bool = False
    # Set when an LLM classifier gave a second opinion.
    classifier_level: RiskLevel | None = None

    @property
    def categories(self) -> frozenset[str]:
        return frozenset(match.category for match in self.matches)

    def summary(self) -> dict[str, Any]:
        """Return a JSON-safe description for turn metadata and logs (no message text)."""
        return {
            "level": self.level.value,
            "categories": sorted(self.categories),
            "rules": list(self.rules),
            "across_turns": self.across_turns,
            "classifier_level": self.classifier_level.value if self.classifier_level else None,
        }


NO_RISK = RiskAssessment(RiskLevel.NONE)


@dataclass(frozen=True, slots=True)
class _Term:
    lang: str
    category: str
    level: RiskLevel
    pattern: re.Pattern[str]
    # Patterns already about another person skip the third-party check.
    third_party: bool


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    # Each set needs at least one of its categories present.
    each_of: tuple[frozenset[str], ...]


@dataclass(slots=True)
class Lexicon:
    """Compiled patterns and rules from a lexicon YAML file."""

    terms: list[_Term]
    exclusions: list[re.Pattern[str]]
    rules: list[_Rule]
    emoji: dict[str, str]
    negation: dict[str, re.Pattern[str]]
    negation_window: dict[str, int]
    negation_breakers: re.Pattern[str]
    third_party_subjects: re.Pattern[str]
    first_person: re.Pattern[str]
    quote_sources: re.Pattern[str]
    # Message-wide cues: academic, recovered, past, present, intrusive, joking,
    # no_plan and ordinary_goodbye.
    cues: dict[str, re.Pattern[str]]
    version: str = ""
    source: str = ""

    @classmethod
    def load(cls, path: Path) -> Lexicon:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(
                f"Cannot read the risk lexicon {str(path)!r}: {exc.strerror}"
            ) from None
        try:
            return cls.from_mapping(data, source=str(path))
        except (KeyError, TypeError, ValueError, re.error) as exc:
            raise ConfigError(f"Invalid risk lexicon {str(path)!r}: {exc}") from None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "") -> Lexicon:
        terms: list[_Term] = []
        for lang, entries in data["terms"].items():
            for entry in entries:
                level = RiskLevel(entry.get("level", "none"))
                for pattern in entry["patterns"]:
                    terms.append(
                        _Term(
                            lang=lang,
                            category=entry["category"],
                            level=level,
                            pattern=compile_pattern(pattern),
                            third_party=bool(entry.get("third_party", False)),
                        )
                    )
        exclusions = [
            compile_pattern(pattern)
            for patterns in data.get("exclusions", {}).values()
            for pattern in patterns
        ]
        rules = [
            _Rule(rule["name"], tuple(frozenset(group) for group in rule["each_of"]))
            for rule in data.get("combinations", [])
        ]
        negation = data["negation"]
        context = data["context"]
        return cls(
            terms=terms,
            exclusions=exclusions,
            rules=rules,
            emoji=dict(data.get("emoji", {})),
            negation={lang: compile_pattern(spec["cues"]) for lang, spec in negation.items()},
            negation_window={lang: int(spec["window_chars"]) for lang, spec in negation.items()},
            negation_breakers=compile_pattern(context["negation_breakers"]),
            third_party_subjects=compile_pattern(context["third_party_subjects"]),
            first_person=compile_pattern(context["first_person"]),
            quote_sources=compile_pattern(context["quote_sources"]),
            cues={
                name: compile_pattern(context[name])
                for name in (
                    "academic",
                    "recovered",
                    "past",
                    "present",
                    "intrusive",
                    "joking",
                    "no_plan",
                    "ordinary_goodbye",
                )
            },
            version=str(data.get("version", "")),
            source=source,
        )


def compile_pattern(pattern: str | Sequence[str]) -> re.Pattern[str]:
    """Compile one pattern, or several as alternatives, with letter runs squeezed."""
    if not isinstance(pattern, str):
        pattern = "|".join(f"(?:{part})" for part in pattern)
    # The text is squeezed ("kill" -> "kil"), so the pattern's letters are too;
    # an escaped letter such as \b or \s is left alone.
    return re.compile(_PATTERN_LETTER_RUNS.sub(r"\1", pattern))


_PATTERN_LETTER_RUNS = re.compile(r"(?<!\\)([^\W\d_])\1+")
# Clause ends: a negation or a subject before one of these does not reach past it.
_CLAUSE_END = re.compile(r"[.!?;,:\n。！？；，：]|\bbut\b|但是|可是|不过")
# A name followed by these is someone spoken to, not the subject: "爸妈对不起，…".
_VOCATIVE = re.compile(r"[,，:：]|对不起|谢谢|再见|抱歉")
_SENTENCE_END = re.compile(r"[.!?;\n。！？；]")
_QUOTED = re.compile(r'"[^"]{1,300}"|「[^」]{1,300}」|『[^』]{1,300}』|《[^》]{1,300}》')


class RiskScreener:
    """Screen user turns for risk with a lexicon; pure Python, no I/O after loading."""

    def __init__(self, lexicon: Lexicon, *, window_turns: int = 6, cache_size: int = 8192) -> None:
        self.lexicon = lexicon
        self._window_turns = window_turns
        # Earlier turns are screened again with every new message; the cache makes that free.
        self._cached_matches = functools.lru_cache(maxsize=cache_size)(self._find_matches)

    def normalize(self, text: str) -> str:
        return normalize_for_screening(text, self.lexicon.emoji)

    def screen(self, text: str) -> RiskAssessment:
        """Screen one message on its own."""
        matches = self.find_matches(text)
        return self._assess(matches, matches)

    def screen_turns(self, text: str, earlier_user_turns: Sequence[str]) -> RiskAssessment:
        """Screen the newest message together with the user's earlier turns, oldest first.

        Earlier turns count only through the combination rules, and only when
        the newest message adds a signal of its own, so a calm message after a
        past crisis does not re-open it.
        """
        newest = self.find_matches(text)
        single = self._assess(newest, newest)
        if not newest or single.level is RiskLevel.CRISIS or not earlier_user_turns:
            return single
        window: list[RiskMatch] = list(newest)
        for earlier in earlier_user_turns[-self._window_turns :]:
            window.extend(self.find_matches(earlier))
        combined = self._assess(newest, window)
        if combined.level > single.level:
            return RiskAssessment(combined.level, single.matches, combined.rules, across_turns=True)
        return single

    def find_matches(self, text: str) -> list[RiskMatch]:
        """Return the lexicon matches in ``text`` that count after negation and context."""
        return list(self._cached_matches(text))

    def _find_matches(self, text: str) -> tuple[RiskMatch, ...]:
        normalized = self.normalize(text)
        if not normalized:
            return ()
        lexicon = self.lexicon
        excluded = [
            match.span() for pattern in lexicon.exclusions for match in pattern.finditer(normalized)
        ]
        quoted = [match.span() for match in _QUOTED.finditer(normalized)]
        cites_story = lexicon.quote_sources.search(normalized) is not None
        cites_source = bool(quoted) and cites_story

        found: list[RiskMatch] = []
        for term in lexicon.terms:
            for match in term.pattern.finditer(normalized):
                start, end = match.span()
                if any(low <= start and end <= high for low, high in excluded):
                    continue
                if cites_source and any(low <= start and end <= high for low, high in quoted):
                    continue
                if self._negated(normalized, start, term.lang):
                    continue
                category, level = term.category, term.level
                if not term.third_party and self._about_someone_else(
                    normalized, start, end, term.lang
                ):
                    # A story, the news or a film about someone else is not a risk.
                    if cites_story or (level is RiskLevel.NONE and category not in _WARNING_SIGNS):
                        continue
                    category, level = "third_party_worry", RiskLevel.ELEVATED
                found.append(RiskMatch(term.lang, category, level, match.group()))
                break
        return tuple(self._apply_context(normalized, found))

    def _apply_context(self, text: str, found: list[RiskMatch]) -> list[RiskMatch]:
        """Discount matches by the context the whole message gives them.

        A study or volunteer question counts for nothing, a past described as
        over drops the matches about it, and a past event or an unwanted
        thought is elevated rather than a crisis unless the message also
        speaks of now. A joke marker ("lol", "哈哈") or a stated lack of plan
        makes crisis words elevated: the bot checks in, but moderators are
        not alerted. An everyday sign-off ("see you tomorrow") is no farewell.
        """
        if not found:
            return found
        cues = self.lexicon.cues
        if cues["academic"].search(text):
            return []
        if cues["recovered"].search(text):
            found = [match for match in found if match.category not in _RECOVERABLE]
        if cues["ordinary_goodbye"].search(text):
            found = [match for match in found if match.category != "farewell"]
        now = cues["present"].search(text) is not None
        for cue, category in (
            ("past", "history"),
            ("intrusive", "intrusive"),
            ("joking", None),
            ("no_plan", None),
        ):
            if (now and cue in ("past", "intrusive")) or not cues[cue].search(text):
                continue
            found = [
                RiskMatch(match.lang, category or match.category, RiskLevel.ELEVATED, match.text)
                if match.level is RiskLevel.CRISIS and match.category not in _OTHERS
                else match
                for match in found
            ]
        return found

    def _assess(self, own: list[RiskMatch], window: list[RiskMatch]) -> RiskAssessment:
        level = highest(match.level for match in own)
        categories = {match.category for match in window}
        fired = tuple(
            rule.name
            for rule in self.lexicon.rules
            if all(group & categories for group in rule.each_of)
        )
        if fired:
            level = RiskLevel.CRISIS
        return RiskAssessment(level, tuple(own), fired)

    def _clause_before(self, text: str, start: int, window: int) -> str:
        before = text[max(0, start - window) : start]
        ends = list(_CLAUSE_END.finditer(before))
        return before[ends[-1].end() :] if ends else before

    def _negated(self, text: str, start: int, lang: str) -> bool:
        pattern = self.lexicon.negation.get(lang)
        if pattern is None:
            return False
        clause = self._clause_before(text, start, self.lexicon.negation_window.get(lang, 24))
        cues = list(pattern.finditer(clause))
        if not cues:
            return False
        # "I don't know why I want to die": a breaker word after the cue ends its reach.
        after_cue = clause[cues[-1].end() :]
        return self.lexicon.negation_breakers.search(after_cue) is None

    def _about_someone_else(self, text: str, start: int, end: int, lang: str) -> bool:
        subjects = self.lexicon.third_party_subjects
        if lang == "zh":
            # Chinese drops "我" freely, so only a topic counts: a person named at the
            # start of the sentence or of the match's comma-clause ("朋友说她想死").
            before = text[max(0, start - 60) : start]
            ends = list(_SENTENCE_END.finditer(before))
            sentence = before[ends[-1].end() :].lstrip() if ends else before.lstrip()
            comma_clause = re.split(r"[,，]", sentence)[-1].lstrip()
            topic = subjects.match(comma_clause) or subjects.match(sentence)
            if topic is None or _VOCATIVE.match(sentence, topic.end()):
                return False
            clause = comma_clause if subjects.match(comma_clause) else sentence
            found = [topic]
        else:
            clause = self._clause_before(text, start, 40)
            found = list(subjects.finditer(clause))
            if not found:
                return False
        # "my friend says I should just die" and "so she's cared for after I'm gone"
        # are still about the writer.
        after_subject = clause[found[-1].end() :] + " " + text[start:end]
        return self.lexicon.first_person.search(after_subject) is None
