"""Benchmark risk screening and reply screening on the labelled sets in bench/safety/data.

Prints precision and recall per level and language, for single messages, the
held-out messages and multi-turn exchanges apart, then the reply-screening
figures and the screening time per message. Run: python bench/safety/screening.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from core.safety.replies import ReplyScreener  # noqa: E402
from core.safety.screening import Lexicon, RiskLevel, RiskScreener  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
LEVELS = [level.value for level in RiskLevel]
TARGETS = {
    "single": 0.98,
    "single dev2": 0.98,
    "holdout": 0.98,
    "multi-turn": 0.85,
    "multi-turn dev2": 0.85,
    "multi-turn holdout": 0.85,
}


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def precision_recall(pairs: Iterable[tuple[str, str]], positive: str) -> tuple[float, float, int]:
    pairs = list(pairs)
    true_pos = sum(1 for gold, got in pairs if gold == positive and got == positive)
    predicted = sum(1 for _, got in pairs if got == positive)
    actual = sum(1 for gold, _ in pairs if gold == positive)
    precision = true_pos / predicted if predicted else float("nan")
    recall = true_pos / actual if actual else float("nan")
    return precision, recall, actual


def report(name: str, rows: list[tuple[str, str, str]], show_errors: bool) -> None:
    """Print per-language figures for rows of (lang, gold level, predicted level)."""
    print(f"\n== {name}: {len(rows)} items ==")
    print(f"{'lang':5} {'level':9} {'n':>4} {'precision':>9} {'recall':>7}")
    for lang in sorted({row[0] for row in rows}):
        pairs = [(gold, got) for row_lang, gold, got in rows if row_lang == lang]
        for level in LEVELS:
            precision, recall, count = precision_recall(pairs, level)
            print(f"{lang:5} {level:9} {count:4d} {precision:9.3f} {recall:7.3f}")
        # Crisis recall counts a crisis found at any level below as missed.
        missed = sum(1 for gold, got in pairs if gold == "crisis" and got != "crisis")
        print(f"{lang:5} crisis missed: {missed}")
    target = TARGETS.get(name)
    if target is not None:
        for lang in sorted({row[0] for row in rows}):
            pairs = [(gold, got) for row_lang, gold, got in rows if row_lang == lang]
            precision, recall, _ = precision_recall(pairs, "crisis")
            verdict = "met" if recall >= target and precision >= 0.7 else "MISSED"
            print(
                f"target {lang}: crisis recall >= {target} and precision >= 0.7: {verdict} "
                f"(recall {recall:.3f}, precision {precision:.3f})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--errors", action="store_true", help="print every wrong label")
    args = parser.parse_args()

    screener = RiskScreener(Lexicon.load(ROOT / "config/safety/lexicon.yaml"))

    for name, file in (
        ("single", "messages.jsonl"),
        ("single dev2", "dev_messages.jsonl"),
        ("holdout", "holdout.jsonl"),
    ):
        rows = []
        for item in read_jsonl(DATA / file):
            got = screener.screen(item["text"]).level.value
            rows.append((item["lang"], item["level"], got))
            if args.errors and got != item["level"]:
                print(f"  {item['id']} gold={item['level']} got={got}: {item['text']}")
        report(name, rows, args.errors)

    for name, file in (
        ("multi-turn", "exchanges.jsonl"),
        ("multi-turn dev2", "dev_exchanges.jsonl"),
        ("multi-turn holdout", "holdout_exchanges.jsonl"),
    ):
        rows = []
        for item in read_jsonl(DATA / file):
            turns = item["user_turns"]
            level = RiskLevel.NONE
            for index, turn in enumerate(turns):
                assessed = screener.screen_turns(turn, turns[:index]).level
                level = max(level, assessed, key=lambda value: value.rank)
            rows.append((item["lang"], item["level"], level.value))
            if args.errors and level.value != item["level"]:
                print(f"  {item['id']} gold={item['level']} got={level.value}: {turns}")
        report(name, rows, args.errors)

    replies = ReplyScreener.load(ROOT / "config/safety/reply_rules.yaml")
    for name, file in (("replies", "replies.jsonl"), ("replies holdout", "holdout_replies.jsonl")):
        reply_rows = []
        for item in read_jsonl(DATA / file):
            at_risk = screener.screen(item["user"]).level is not RiskLevel.NONE
            verdict = replies.screen(item["reply"], user_at_risk=at_risk)
            got = "unsafe" if verdict.unsafe else "safe"
            reply_rows.append((item["lang"], item["label"], got))
            if args.errors and got != item["label"]:
                print(f"  {item['id']} gold={item['label']} got={got}: {item['reply']}")
        print(f"\n== reply screening, {name}: {len(reply_rows)} replies ==")
        for lang in sorted({row[0] for row in reply_rows}):
            pairs = [(gold, got) for row_lang, gold, got in reply_rows if row_lang == lang]
            precision, recall, count = precision_recall(pairs, "unsafe")
            print(f"{lang:5} unsafe n={count:3d} precision {precision:.3f} recall {recall:.3f}")

    texts = [item["text"] for item in read_jsonl(DATA / "messages.jsonl")]
    timings = []
    # A screener without a cache, so every screening does the full work.
    uncached = RiskScreener(screener.lexicon, cache_size=0)
    for _ in range(5):
        for text in texts:
            started = time.perf_counter()
            uncached.screen(text)
            timings.append((time.perf_counter() - started) * 1000)
    timings.sort()
    p50 = statistics.median(timings)
    p99 = timings[int(len(timings) * 0.99) - 1]
    print(f"\n== screening time per message ({len(timings)} screenings, lexicon only) ==")
    print(f"p50 {p50:.3f} ms, p99 {p99:.3f} ms, max {timings[-1]:.3f} ms (target p99 < 1 ms)")


if __name__ == "__main__":
    main()
