"""Rubric scoring: an LLM judge rates dialogues on four criteria, 1 to 5 each, with reasons.

Two methods produce the scores. With ``generate`` the judge writes a JSON
object. The judge prompt (config/rubric/judge.{en,zh-CN}.txt) carries the
full rubric and is chosen by the dialogue's language, and ``PROMPT_VERSION``
is stored with every score. A response that is not a complete, in-range JSON
object gets one repair request. If that fails too, the raw text is stored as
a judge error, never as a score. With ``likelihood`` (local models only) the
judge writes nothing. Each criterion's score is the digit 1 to 5 with the
highest next-token probability, so models too small to write JSON still get
scores. Scoring a dialogue again with the same judge, prompt, method
and sampling reuses the stored score unless forced.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.config import CONFIG_DIR
from core.errors import ConfigError, ContextLengthExceeded, GenerationError
from core.generation.base import ChatMessage, Generator, SamplingParams
from core.generation.chat_tokens import encode_chat
from core.storage.models import RubricScore, utcnow

_LOGGER = logging.getLogger(__name__)

CRITERIA = ("therapeutic_relevance", "user_engagement", "safety", "problem_resolution")
# Raise when the prompt files change, so scores from different prompts are kept apart.
PROMPT_VERSION = "rubric-2026-12-04"
PROMPT_FILES = {"en": "judge.en.txt", "zh": "judge.zh-CN.txt"}
JUDGE_SAMPLING = SamplingParams(max_new_tokens=400, temperature=0.0, top_p=1.0)
METHODS = ("generate", "likelihood")
# Per-criterion prompts of the likelihood method. The rubric text itself comes from PROMPT_FILES.
LIKELIHOOD_PROMPT_FILES = {"en": "likelihood.en.txt", "zh": "likelihood.zh-CN.txt"}
# Raise when the likelihood prompt files change. It is part of the likelihood settings key, so
# scores from older likelihood prompts are not reused.
LIKELIHOOD_PROMPT_VERSION = "likelihood-2026-12-05"
SCORE_DIGITS = "12345"

_FENCE = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.DOTALL)
_REFUSAL = re.compile(
    r"\b(?:i can(?:no|')t|i am unable|i'm unable|i won't|sorry|as an ai)\b|无法|抱歉|不能评", re.I
)
_CJK = re.compile(r"[\u4e00-\u9fff]")
# A "[system]" or "[user]" line starts a message template in a likelihood prompt file.
_TEMPLATE_SECTION = re.compile(r"^\[(system|user)\]$", re.MULTILINE)
# A numbered criterion heading in the judge prompt, such as "3. safety" or "3. safety（安全性）".
_CRITERION_HEADING = re.compile(r"^\d+\.\s+(\w+)")


class JudgeAnswerError(ValueError):
    """The judge response contains no usable score; the message names the problem."""


@dataclass(frozen=True, slots=True)
class Dialogue:
    conversations: list[dict[str, str]]
    source: str
    # The adapter version that produced the assistant turns, when known.
    adapter_version: str | None = None

    @property
    def key(self) -> str:
        """Return a stable hash of the turns, which identifies the dialogue across sources."""
        canonical = json.dumps(self.conversations, ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def language(self) -> str:
        text = "".join(turn["content"] for turn in self.conversations if turn["role"] == "user")
        return "zh" if len(_CJK.findall(text)) > len(text) * 0.2 else "en"


@dataclass(slots=True)
class Judgement:
    scores: dict[str, int] | None
    reasons: dict[str, str] | None
    raw: str
    error: str | None = None
    attempts: int = 1


@dataclass(slots=True)
class ScoreSummary:
    scored: int = 0
    reused: int = 0
    errors: int = 0
    # Scores per criterion, one list entry per stored score (errors left out).
    values: dict[str, list[int]] = field(default_factory=lambda: {name: [] for name in CRITERIA})
    # Per criterion: the mean standard deviation across repeats of one dialogue.
    spread: dict[str, float] = field(default_factory=dict)

    def means(self) -> dict[str, float | None]:
        return {
            name: statistics.fmean(values) if values else None
            for name, values in self.values.items()
        }


def load_prompt(language: str) -> str:
    return (CONFIG_DIR / "rubric" / PROMPT_FILES[language]).read_text(encoding="utf-8").strip()


def render_dialogue(dialogue: Dialogue) -> str:
    return _render_turns(dialogue.conversations, dialogue.language)


def _render_turns(turns: Sequence[dict[str, str]], language: str) -> str:
    names = {"zh": {"user": "用户", "assistant": "聊天机器人"}, "en": {}}[language]
    lines = []
    for turn in turns:
        if turn["role"] not in ("user", "assistant"):
            continue
        label = names.get(turn["role"], "User" if turn["role"] == "user" else "Chatbot")
        lines.append(f"{label}: {turn['content']}")
    return "\n".join(lines)


def parse_judgement(text: str) -> tuple[dict[str, int], dict[str, str]]:
    """Read the four scores and reasons from a judge response, or raise JudgeAnswerError."""
    candidate = None
    fenced = _FENCE.search(text)
    if fenced:
        candidate = fenced.group(1)
    elif "{" in text:
        start = text.index("{")
        end = text.rfind("}")
        if end <= start:
            raise JudgeAnswerError("the JSON object is cut off (truncated)")
        candidate = text[start : end + 1]
    if candidate is None:
        if _REFUSAL.search(text):
            raise JudgeAnswerError("the response is a refusal, not a rating")
        raise JudgeAnswerError("the response contains no JSON object")
    try:
        data = json.loads(candidate)
    except json.JSONDecodeError as exc:
        raise JudgeAnswerError(f"the JSON object is invalid or truncated ({exc.msg})") from None
    if not isinstance(data, dict):
        raise JudgeAnswerError("the response is not a JSON object")

    scores: dict[str, int] = {}
    reasons: dict[str, str] = {}
    for name in CRITERIA:
        entry = data.get(name)
        if entry is None:
            raise JudgeAnswerError(f"the criterion {name!r} is missing")
        score = entry.get("score") if isinstance(entry, dict) else entry
        reason = entry.get("reason", "") if isinstance(entry, dict) else ""
        try:
            value = int(str(score).strip())
        except ValueError:
            raise JudgeAnswerError(f"the score of {name!r} is not a number: {score!r}") from None
        if not 1 <= value <= 5:
            raise JudgeAnswerError(f"the score of {name!r} is {value}, outside 1 to 5")
        scores[name] = value
        reasons[name] = str(reason).strip()
    return scores, reasons


async def judge_dialogue(
    generator: Generator, dialogue: Dialogue, sampling: SamplingParams = JUDGE_SAMPLING
) -> Judgement:
    """Ask the judge once, and once more with a repair request when the response is unusable."""
    messages = [
        ChatMessage("system", load_prompt(dialogue.language)),
        ChatMessage("user", render_dialogue(dialogue)),
    ]
    raw_answers: list[str] = []
    problem = ""
    for attempt in (1, 2):
        try:
            result = await generator.generate(messages, sampling)
        except GenerationError as exc:
            return Judgement(
                None, None, "\n---\n".join(raw_answers), f"judge failed: {exc}", attempt
            )
        raw_answers.append(result.text)
        try:
            scores, reasons = parse_judgement(result.text)
        except JudgeAnswerError as exc:
            problem = str(exc)
            messages = [
                *messages,
                ChatMessage("assistant", result.text),
                ChatMessage(
                    "user",
                    f"Your answer could not be used: {problem}. Answer again with only the "
                    "JSON object, every criterion with a score from 1 to 5 and a reason.",
                ),
            ]
            continue
        return Judgement(scores, reasons, result.text, None, attempt)
    return Judgement(None, None, "\n---\n".join(raw_answers), problem, 2)


def criterion_rubric(language: str, criterion: str) -> tuple[str, str]:
    """Return the heading and the scale of one criterion, cut from the judge prompt.

    The heading is the line after the number ("safety" or "safety（安全性）"), and
    the scale is the heading with the indented lines below it.
    """
    lines = load_prompt(language).splitlines()
    for index, line in enumerate(lines):
        match = _CRITERION_HEADING.match(line)
        if match is None or match.group(1) != criterion:
            continue
        heading = line[match.start(1) :].strip()
        block = [heading]
        for scale_line in lines[index + 1 :]:
            if not scale_line.startswith((" ", "\t")):
                break
            block.append(scale_line)
        return heading, "\n".join(block)
    raise ConfigError(
        f"The judge prompt {PROMPT_FILES[language]!r} has no numbered heading for the criterion "
        f"{criterion!r}; add a line such as '1. {criterion}' followed by its indented scale."
    )


def load_likelihood_templates(language: str) -> tuple[str, str]:
    """Return the system and user message templates of the likelihood method for ``language``.

    The system template takes ``{rubric}`` and the user template takes
    ``{dialogue}`` and ``{criterion}``, filled with ``str.format``.
    """
    name = LIKELIHOOD_PROMPT_FILES[language]
    text = (CONFIG_DIR / "rubric" / name).read_text(encoding="utf-8")
    parts = _TEMPLATE_SECTION.split(text)
    # re.split with one group returns [before, role, body, role, body, ...].
    sections = dict(zip(parts[1::2], parts[2::2], strict=True))
    if set(sections) != {"system", "user"} or len(parts) != 5:
        raise ConfigError(
            f"The likelihood prompt {name!r} must contain one '[system]' line and one '[user]' "
            "line, each followed by its message template."
        )
    return sections["system"].strip(), sections["user"].strip()


def likelihood_messages(dialogue_text: str, language: str, criterion: str) -> list[ChatMessage]:
    """Build the chat messages that ask for one criterion's score of a rendered dialogue."""
    heading, rubric = criterion_rubric(language, criterion)
    system, user = load_likelihood_templates(language)
    return [
        ChatMessage("system", system.format(rubric=rubric)),
        ChatMessage("user", user.format(dialogue=dialogue_text, criterion=heading)),
    ]


def digit_token_ids(tokenizer: Any) -> list[int]:
    """Return the token ids of the digits 1 to 5, or raise ConfigError if one is not one token."""
    token_ids = []
    for digit in SCORE_DIGITS:
        encoded = tokenizer.encode(digit, add_special_tokens=False)
        if len(encoded) != 1:
            raise ConfigError(
                f"The judge tokenizer encodes the digit {digit!r} as {len(encoded)} tokens "
                f"{encoded}, but the likelihood method needs one token per digit 1 to 5; "
                "score with method 'generate' or another judge model."
            )
        token_ids.append(int(encoded[0]))
    return token_ids


def _fit_likelihood_prompt(
    tokenizer: Any,
    turns: list[dict[str, str]],
    language: str,
    criterion: str,
    context_length: int,
) -> tuple[list[int], str]:
    """Encode the prompt of one criterion within ``context_length`` tokens.

    Returns the prompt ids and a note on what was left out ("" when nothing
    was). Oldest turns go first. When the newest turn alone is too long, its
    beginning is cut as well. Raises ContextLengthExceeded when the prompt
    without any dialogue text does not fit.
    """

    def encode(kept: list[dict[str, str]]) -> list[int]:
        messages = likelihood_messages(_render_turns(kept, language), language, criterion)
        return encode_chat(tokenizer, messages, add_generation_prompt=True)

    prompt_ids = encode(turns)
    if len(prompt_ids) <= context_length:
        return prompt_ids, ""

    # Binary search for the fewest oldest turns to leave out. It works because the prompt
    # never gets longer as more turns go.
    low, high = 1, len(turns) - 1
    fitted: tuple[int, list[int]] | None = None
    while low <= high:
        start = (low + high) // 2
        candidate = encode(turns[start:])
        if len(candidate) <= context_length:
            fitted = (start, candidate)
            high = start - 1
        else:
            low = start + 1
    if fitted is not None:
        start, prompt_ids = fitted
        return prompt_ids, f"oldest {start} of {len(turns)} turns left out to fit the context"

    too_long = ContextLengthExceeded(
        f"The likelihood prompt for {criterion!r} does not fit the judge's context of "
        f"{context_length} tokens even without the dialogue."
    )
    if not turns:
        raise too_long
    newest = dict(turns[-1])
    content_ids = tokenizer.encode(newest["content"], add_special_tokens=False)
    excess = len(encode([newest])) - context_length
    while excess > 0:
        if excess >= len(content_ids):
            raise too_long
        # Decoding and encoding again can change the token count, so check and cut again.
        content_ids = content_ids[excess:]
        newest["content"] = "…" + tokenizer.decode(content_ids)
        prompt_ids = encode([newest])
        excess = len(prompt_ids) - context_length
    return prompt_ids, (
        f"only the end of the newest turn kept (oldest {len(turns) - 1} of {len(turns)} turns "
        "left out) to fit the context"
    )


def _digit_probabilities(
    model: Any, device: Any, prompt_ids: list[int], digit_ids: list[int]
) -> tuple[list[float], float]:
    """Run one forward pass and return the next-token probabilities of the digits.

    Returns the probabilities renormalised over the digits alone, and the digits'
    share of the full next-token distribution.
    """
    import torch

    with torch.inference_mode():
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        output = model(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), logits_to_keep=1
        )
        logits = output.logits[0, -1].float()
        digit_logits = logits[digit_ids]
        probabilities = torch.softmax(digit_logits, dim=-1)
        digit_mass = torch.softmax(logits, dim=-1)[digit_ids].sum()
    return probabilities.tolist(), float(digit_mass)


async def judge_by_likelihood(generator: Any, dialogue: Dialogue) -> Judgement:
    """Score each criterion by the judge model's next-token probabilities of the digits 1 to 5.

    For each criterion the judge gets that criterion's scale and the dialogue.
    One forward pass gives the probabilities of the digits as the first reply
    token, and the score is the most probable digit (the lower one on a tie).
    The reason gives the probability-weighted mean, the probabilities over the
    five digits, and the digits' share of all next-token probability, which is
    low when the model would rather write something else. Oldest turns are left
    out when the prompt exceeds ``generator.context_length``.

    ``generator`` must be a started LocalGenerator. Its ``model`` is called
    directly, outside the generator's batcher, so score only while nothing
    else generates with it. Raises ConfigError when a digit is not a single
    token. A forward pass that runs out of memory, or a prompt that cannot
    fit, becomes a judge error.

    NOTE: the embedded SmolLM2-135M-Instruct (float32 on CPU) gave digit 1 the
    highest probability on 86 of the 88 dialogues in
    bench/eval/data/judge_pairs.jsonl, so its scores hardly tell better replies
    from worse ones.
    """
    import torch

    tokenizer = generator.tokenizer
    digit_ids = digit_token_ids(tokenizer)
    language = dialogue.language
    turns = [turn for turn in dialogue.conversations if turn["role"] in ("user", "assistant")]
    scores: dict[str, int] = {}
    reasons: dict[str, str] = {}
    details: dict[str, dict[str, Any]] = {}
    for criterion in CRITERIA:
        try:
            # Encoding stays on the event loop thread, as in LocalGenerator.generate,
            # because transformers tokenizers change shared state for each call.
            prompt_ids, left_out = _fit_likelihood_prompt(
                tokenizer, turns, language, criterion, generator.context_length
            )
            probabilities, digit_mass = await asyncio.to_thread(
                _digit_probabilities, generator.model, generator.device, prompt_ids, digit_ids
            )
        except (ContextLengthExceeded, torch.OutOfMemoryError) as exc:
            raw = json.dumps(details, ensure_ascii=False)
            return Judgement(None, None, raw, f"likelihood judge failed on {criterion}: {exc}")
        expected = sum(int(digit) * p for digit, p in zip(SCORE_DIGITS, probabilities, strict=True))
        best = max(range(len(SCORE_DIGITS)), key=lambda index: probabilities[index])
        scores[criterion] = int(SCORE_DIGITS[best])
        shown = " ".join(
            f"p{digit} {p:.2f}" for digit, p in zip(SCORE_DIGITS, probabilities, strict=True)
        )
        reason = (
            f"likelihood judge: expected {expected:.2f} ({shown}), "
            f"digit share of next-token probability {digit_mass:.2f}"
        )
        if left_out:
            reason += f"; {left_out}"
        reasons[criterion] = reason
        details[criterion] = {
            "probabilities": probabilities,
            "digit_mass": digit_mass,
            "prompt_tokens": len(prompt_ids),
        }
    return Judgement(scores, reasons, json.dumps(details, ensure_ascii=False))


def sampling_key(sampling: SamplingParams, method: str = "generate") -> str:
    """Return a short hash of the judging settings, part of what makes a score reusable.

    For ``generate`` the hash covers the sampling settings alone, which keeps the
    keys of scores stored before the likelihood method existed. For ``likelihood``,
    which samples nothing, it covers the method and ``LIKELIHOOD_PROMPT_VERSION``.
    The two methods never share a key because the hashed objects differ.
    """
    settings: dict[str, Any]
    if method == "generate":
        settings = dataclasses.asdict(sampling)
    elif method == "likelihood":
        settings = {"method": method, "prompt_version": LIKELIHOOD_PROMPT_VERSION}
    else:
        raise ValueError(f"Invalid judging method {method!r}; expected one of {METHODS}.")
    canonical = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


async def score_dialogues(
    sessions: async_sessionmaker[AsyncSession],
    generator: Generator,
    dialogues: Iterable[Dialogue],
    *,
    repeat: int = 1,
    force: bool = False,
    sampling: SamplingParams = JUDGE_SAMPLING,
    method: str = "generate",
) -> ScoreSummary:
    """Score every dialogue ``repeat`` times, store the results and summarise them.

    ``method`` is ``generate`` (the judge writes JSON, see ``judge_dialogue``) or
    ``likelihood`` (digit probabilities of a local judge, see ``judge_by_likelihood``,
    which ignores ``sampling``). Raises ConfigError for likelihood with a judge that
    is not a local model.
    """
    if method not in METHODS:
        raise ValueError(f"Invalid judging method {method!r}; expected one of {METHODS}.")
    if method == "likelihood" and not hasattr(type(generator), "model"):
        raise ConfigError(
            f"The likelihood method needs a local judge model, but the judge "
            f"{generator.model_name!r} uses the {generator.name!r} backend; set the generator "
            "backend to 'local' or score with method 'generate'."
        )
    summary = ScoreSummary()
    spreads: dict[str, list[float]] = {name: [] for name in CRITERIA}
    settings = sampling_key(sampling, method)
    judge_model = generator.model_name
    for dialogue in dialogues:
        per_repeat: dict[str, list[int]] = {name: [] for name in CRITERIA}
        for index in range(repeat):
            identity = {
                "dialogue_key": dialogue.key,
                "judge_model": judge_model,
                "prompt_version": PROMPT_VERSION,
                "settings_key": settings,
                "repeat_index": index,
            }
            stored = None if force else await _stored_score(sessions, identity)
            if stored is None:
                if method == "likelihood":
                    judgement = await judge_by_likelihood(generator, dialogue)
                else:
                    judgement = await judge_dialogue(generator, dialogue, sampling)
                stored = await _store(sessions, identity, dialogue, judgement)
                summary.scored += 1
            else:
                summary.reused += 1
            if stored.error is not None or stored.scores is None:
                summary.errors += 1
                continue
            for name in CRITERIA:
                summary.values[name].append(stored.scores[name])
                per_repeat[name].append(stored.scores[name])
        for name, values in per_repeat.items():
            if len(values) > 1:
                spreads[name].append(statistics.pstdev(values))
    summary.spread = {name: statistics.fmean(values) for name, values in spreads.items() if values}
    return summary


async def _stored_score(
    sessions: async_sessionmaker[AsyncSession], identity: dict[str, Any]
) -> RubricScore | None:
    async with sessions() as session:
        statement = select(RubricScore).filter_by(**identity)
        return (await session.execute(statement)).scalar_one_or_none()


async def _store(
    sessions: async_sessionmaker[AsyncSession],
    identity: dict[str, Any],
    dialogue: Dialogue,
    judgement: Judgement,
) -> RubricScore:
    async with sessions.begin() as session:
        await session.execute(delete(RubricScore).filter_by(**identity))
        row = RubricScore(
            **identity,
            source=dialogue.source,
            language=dialogue.language,
            dialogue=dialogue.conversations,
            adapter_version=dialogue.adapter_version,
            scores=judgement.scores,
            reasons=judgement.reasons,
            error=judgement.error,
            raw=judgement.raw if judgement.error else None,
            attempts=judgement.attempts,
            created_at=utcnow(),
        )
        session.add(row)
    if judgement.error:
        _LOGGER.warning("Judge error on dialogue %s: %s", dialogue.key[:12], judgement.error)
    return row


def read_dialogues(path: Path, *, source: str, limit: int | None = None) -> list[Dialogue]:
    """Read dialogues in the training format (an export or any such JSONL file)."""
    dialogues = []
    with path.open(encoding="utf-8") as file:
        for line in file:
            if not line.strip():
                continue
            item = json.loads(line)
            turns = [
                {"role": turn["role"], "content": turn["content"]}
                for turn in item["conversations"]
                if turn.get("role") in ("user", "assistant")
            ]
            if any(turn["role"] == "assistant" for turn in turns):
                dialogues.append(Dialogue(turns, source, item.get("adapter_version")))
            if limit is not None and len(dialogues) >= limit:
                break
    return dialogues


async def sample_database(
    sessions: async_sessionmaker[AsyncSession],
    count: int,
    *,
    days: int = 30,
    seed: int | None = None,
) -> list[Dialogue]:
    """Pick ``count`` recent conversations of users who consented to training and scoring.

    The turns are scrubbed of personal data and merged as in an export.
    """
    import datetime as dt
    import random

    from core.privacy.export import training_messages
    from core.storage.models import Turn, User

    since = utcnow() - dt.timedelta(days=days)
    async with sessions() as session:
        candidates = list(
            (
                await session.execute(
                    select(Turn.conversation_id)
                    .join(User, User.id == Turn.user_id)
                    .where(User.training_consent.is_(True), Turn.created_at >= since)
                    .distinct()
                )
            ).scalars()
        )
        chosen = random.Random(seed).sample(candidates, min(count, len(candidates)))
        dialogues = []
        for conversation_id in sorted(chosen):
            turns = (
                await session.execute(
                    select(Turn.role, Turn.content, Turn.revision, Turn.meta)
                    .where(Turn.conversation_id == conversation_id)
                    .order_by(Turn.created_at, Turn.id)
                )
            ).all()
            kept = [
                (role, content)
                for role, content, revision, meta in turns
                if revision == 0 and not (meta and meta.get("legal_basis"))
            ]
            messages = training_messages(kept)
            if messages:
                dialogues.append(Dialogue(messages, "database"))
    return dialogues


def spread_per_criterion(rows: Sequence[RubricScore]) -> dict[str, float]:
    """Return, per criterion, the mean population standard deviation across a dialogue's repeats."""
    by_dialogue: dict[str, list[dict[str, int]]] = {}
    for row in rows:
        if row.scores:
            by_dialogue.setdefault(row.dialogue_key, []).append(row.scores)
    spreads: dict[str, float] = {}
    for name in CRITERIA:
        values = [
            statistics.pstdev([scores[name] for scores in repeats])
            for repeats in by_dialogue.values()
            if len(repeats) > 1
        ]
        if values:
            spreads[name] = statistics.fmean(values)
    return spreads


async def generate_eval_dialogues(
    generator: Generator,
    builder: Any,
    sampling: SamplingParams,
    source_path: Path,
    out_path: Path,
    *,
    adapter_version: str,
    limit: int | None = None,
    max_user_turns: int | None = None,
) -> int:
    """Play each dialogue's user turns through ``generator`` and write the new dialogues.

    The output is in the training format with ``adapter_version``, so two
    adapters scored on the same file are compared on the same user turns.
    ``max_user_turns`` plays only the first that many user turns of each
    dialogue. Returns how many dialogues were written.
    """
    from core.prompt import HistoryTurn

    if max_user_turns is not None and max_user_turns < 1:
        raise ValueError(f"`max_user_turns` must be at least 1; got {max_user_turns!r}.")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    partial = out_path.with_name(out_path.name + ".partial")
    with source_path.open(encoding="utf-8") as source, partial.open("w", encoding="utf-8") as out:
        for line in source:
            if not line.strip():
                continue
            item = json.loads(line)
            user_turns = [
                turn["content"] for turn in item["conversations"] if turn.get("role") == "user"
            ]
            if not user_turns:
                continue
            if max_user_turns is not None:
                user_turns = user_turns[:max_user_turns]
            dialogue = Dialogue([{"role": "user", "content": user_turns[0]}], "generate-eval")
            locale = "zh-CN" if dialogue.language == "zh" else "en"
            history: list[HistoryTurn] = []
            conversations: list[dict[str, str]] = []
            for text in user_turns:
                history.append(HistoryTurn("user", text))
                built = builder.build(history, locale)
                result = await generator.generate(built.messages, sampling)
                reply = result.text.strip()
                history.append(HistoryTurn("assistant", reply))
                conversations += [
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": reply},
                ]
            record = {"conversations": conversations, "adapter_version": adapter_version}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
            if limit is not None and written >= limit:
                break
    partial.replace(out_path)
    return written


def read_pairs(path: Path) -> list[Dialogue]:
    """Read labelled judge pairs as dialogues whose source names the pair, side and criterion."""
    dialogues = []
    with path.open(encoding="utf-8") as file:
        for line in file:
            if not line.strip():
                continue
            item = json.loads(line)
            for side in ("better", "worse"):
                source = f"pairs:{item['id']}:{side}:{item['criterion']}"
                dialogues.append(Dialogue(item[side]["conversations"], source))
    return dialogues


def pair_agreement(rows: Sequence[RubricScore]) -> dict[str, dict[str, tuple[int, int]]]:
    """Return per judge and criterion (pairs ranked right, pairs judged) from stored pair scores.

    A pair counts as ranked right when the better dialogue scored strictly
    higher on the pair's criterion. A judge error on either side leaves the pair out.
    """
    sides: dict[tuple[str, str, str], dict[str, int]] = {}
    for row in rows:
        if not row.source.startswith("pairs:") or not row.scores or row.repeat_index != 0:
            continue
        _, pair_id, side, criterion = row.source.split(":", 3)
        sides.setdefault((row.judge_model, pair_id, criterion), {})[side] = row.scores[criterion]
    results: dict[str, dict[str, tuple[int, int]]] = {}
    for (judge, _, criterion), scores in sides.items():
        if set(scores) != {"better", "worse"}:
            continue
        right, total = results.setdefault(judge, {}).get(criterion, (0, 0))
        results[judge][criterion] = (right + (scores["better"] > scores["worse"]), total + 1)
    return results
