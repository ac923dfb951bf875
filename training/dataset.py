"""Training datasets: exports and public corpora, validated, deduplicated, mixed and split.

Every line is checked for known roles, an optional system turn first and no
empty content. Consecutive turns of one role are merged, and assistant turns
before the first user turn and a trailing unanswered user turn are dropped.
Dialogues without a complete exchange, duplicates, dialogues that begin a
longer one (a conversation exported again after it went on) and tombstoned
users' dialogues are left out, each with its reason counted. The split is by a hash
of the dialogue, so the same dialogue lands in the same split in every build
and never in two.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "validation", "test")
_CJK = re.compile(r"[\u4e00-\u9fff]")
# An assistant side shorter than this (characters, all turns together) is near-empty.
MIN_ASSISTANT_CHARS = 8


@dataclass(slots=True)
class Example:
    conversations: list[dict[str, str]]
    source: str
    language: str
    key: str


@dataclass(slots=True)
class BuildReport:
    kept: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    # Per language: dialogues, turns and tokens written.
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)


def validate(item: Any) -> tuple[list[dict[str, str]] | None, str | None]:
    """Return the dialogue's turns ready for training, or None and the reason it is dropped.

    Consecutive turns of one role are merged, so the turns alternate, and
    assistant turns before the first user turn are left out.
    """
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
        return None, "no conversations list"
    turns: list[dict[str, str]] = []
    for turn in item["conversations"]:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            return None, "unknown role"
        content = turn.get("content")
        if not isinstance(content, str) or not content.strip():
            return None, "empty content"
        turns.append({"role": turn["role"], "content": content.strip()})
    system = turns[:1] if turns and turns[0]["role"] == "system" else []
    # Several messages in a row from one side (common in chat corpora) become one turn.
    body: list[dict[str, str]] = []
    for turn in turns[len(system) :]:
        if turn["role"] == "system":
            return None, "system turn after the start"
        if body and body[-1]["role"] == turn["role"]:
            body[-1] = {
                "role": turn["role"],
                "content": body[-1]["content"] + "\n" + turn["content"],
            }
        else:
            body.append(turn)
    # A greeting the assistant opens with replies to nothing, so it is left out.
    while body and body[0]["role"] != "user":
        body.pop(0)
    turns = system + body
    if body and body[-1]["role"] == "user":
        # A trailing user turn has no reply to learn from.
        turns = turns[:-1]
        body = body[:-1]
    if not body:
        return None, "no complete exchange"
    assistant_chars = sum(len(turn["content"]) for turn in body if turn["role"] == "assistant")
    if assistant_chars < MIN_ASSISTANT_CHARS:
        return None, "near-empty"
    return turns, None


def language_of(turns: list[dict[str, str]]) -> str:
    text = "".join(turn["content"] for turn in turns)
    return "zh" if len(_CJK.findall(text)) > len(text) * 0.2 else "en"


def dialogue_key(turns: list[dict[str, str]]) -> str:
    canonical = json.dumps(
        [(turn["role"], " ".join(turn["content"].split())) for turn in turns], ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def split_of(key: str, ratios: Mapping[str, float]) -> str:
    """Return the split a dialogue belongs to, from its key: stable across builds."""
    position = int(key[:8], 16) / 0xFFFFFFFF
    edge = 0.0
    for name in SPLITS:
        edge += ratios[name]
        if position < edge:
            return name
    return SPLITS[-1]


def jsonl_items(path: Path, dropped: Counter[str]) -> Iterator[Any]:
    """Yield the parsed lines of a JSONL file, skipping blank ones and counting invalid JSON."""
    with path.open(encoding="utf-8") as file:
        for line in file:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                dropped["invalid JSON"] += 1


def read_examples(
    path: Path, source: str, tombstones: set[str], report: BuildReport
) -> Iterable[Example]:
    for item in jsonl_items(path, report.dropped):
        if isinstance(item, dict) and item.get("user") in tombstones:
            report.dropped["tombstoned"] += 1
            continue
        turns, reason = validate(item)
        if turns is None:
            report.dropped[reason or "invalid"] += 1
            continue
        yield Example(turns, source, language_of(turns), dialogue_key(turns))


def drop_prefixes(examples: list[Example], report: BuildReport) -> list[Example]:
    """Leave out every dialogue whose turns begin another, longer dialogue.

    An export contains each conversation with new turns whole, so a conversation that
    goes on across exports comes back longer each time. Only the longest copy is
    kept, which also keeps a shorter copy out of the test split while the longer
    one trains.
    """
    prefixes: set[bytes] = set()
    full: list[bytes] = []
    for example in examples:
        signatures = _prefix_signatures(example.conversations)
        prefixes.update(signatures[:-1])
        full.append(signatures[-1])
    longest = [example for example, key in zip(examples, full, strict=True) if key not in prefixes]
    if len(longest) < len(examples):
        report.dropped["beginning of a longer dialogue"] += len(examples) - len(longest)
    return longest


def _prefix_signatures(turns: list[dict[str, str]]) -> list[bytes]:
    """Return a digest of the first 1, 2, ... n turns, with white space normalised."""
    digest = hashlib.sha256()
    signatures = []
    for turn in turns:
        content = " ".join(turn["content"].split())
        digest.update(json.dumps([turn["role"], content], ensure_ascii=False).encode("utf-8"))
        signatures.append(digest.copy().digest())
    return signatures


def mix(
    examples: list[Example], language_ratios: Mapping[str, float] | None, seed: int
) -> list[Example]:
    """Downsample languages so that they follow ``language_ratios`` (None keeps everything)."""
    if not language_ratios:
        return examples
    by_language: dict[str, list[Example]] = {}
    for example in examples:
        by_language.setdefault(example.language, []).append(example)
    wanted = {lang: ratio for lang, ratio in language_ratios.items() if ratio > 0}
    # The largest total that every language can supply at its ratio.
    total = min(len(by_language.get(lang, [])) / ratio for lang, ratio in wanted.items())
    rng = random.Random(seed)
    mixed = []
    for lang, ratio in wanted.items():
        pool = sorted(by_language.get(lang, []), key=lambda example: example.key)
        mixed += rng.sample(pool, int(total * ratio))
    return sorted(mixed, key=lambda example: example.key)


def build_dataset(
    sources: list[tuple[str, Path]],
    out_dir: Path,
    *,
    tombstones: set[str] | None = None,
    split_ratios: Mapping[str, float] | None = None,
    language_ratios: Mapping[str, float] | None = None,
    count_tokens: Callable[[str], int] | None = None,
    seed: int = 0,
) -> BuildReport:
    """Write train, validation and test JSONL files and a manifest to ``out_dir``."""
    ratios = split_ratios or {"train": 0.9, "validation": 0.05, "test": 0.05}
    tombstones = tombstones or set()
    count_tokens = count_tokens or estimate_tokens
    report = BuildReport()
    seen: set[str] = set()
    examples: list[Example] = []
    for source, path in sources:
        for example in read_examples(path, source, tombstones, report):
            if example.key in seen:
                report.dropped["duplicate"] += 1
                continue
            seen.add(example.key)
            examples.append(example)
    examples = drop_prefixes(examples, report)
    for example in examples:
        report.kept[example.source] += 1
    mixed = mix(examples, language_ratios, seed)
    report.dropped["mixing (language ratios)"] += len(examples) - len(mixed)

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: (out_dir / f"{name}.jsonl").open("w", encoding="utf-8") for name in SPLITS}
    try:
        for example in mixed:
            split = split_of(example.key, ratios)
            files[split].write(
                json.dumps({"conversations": example.conversations}, ensure_ascii=False) + "\n"
            )
            report.splits[split] = report.splits.get(split, 0) + 1
            stats = report.stats.setdefault(
                example.language, {"dialogues": 0, "turns": 0, "tokens": 0}
            )
            stats["dialogues"] += 1
            stats["turns"] += len(example.conversations)
            stats["tokens"] += sum(count_tokens(turn["content"]) for turn in example.conversations)
    finally:
        for file in files.values():
            file.close()

    manifest = {
        "sources": [
            {"name": name, "path": str(path), "sha256": file_sha256(path)} for name, path in sources
        ],
        "kept_per_source": dict(report.kept),
        "dropped": dict(report.dropped),
        "splits": report.splits,
        "split_ratios": dict(ratios),
        "language_ratios": dict(language_ratios or {}),
        "stats": report.stats,
        "tombstones_applied": len(tombstones),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return report


def estimate_tokens(text: str) -> int:
    """Estimate tokens without a tokenizer: one per CJK character, one per word otherwise."""
    cjk = len(_CJK.findall(text))
    return cjk + len(_CJK.sub(" ", text).split())


def file_sha256(path: Path) -> str:
    """Return the SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
