"""Benchmark PII scrubbing on bench/export/data/pii.jsonl: recall and precision per type.

A found span counts as correct when it has the labelled type and overlaps the
labelled span; recall also reports how many labelled spans were fully covered
by some placeholder, whatever its type (what matters for privacy).
Run: python bench/export/scrubbing.py [--errors]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from core.privacy.scrub import PiiType, find_pii  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "pii.jsonl"
TARGETS = {"phone", "email", "cn_id", "bank_card", "ip", "url"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--errors", action="store_true", help="print every miss and false alarm")
    args = parser.parse_args()

    items = [json.loads(line) for line in DATA.open(encoding="utf-8") if line.strip()]
    gold_count: Counter[str] = Counter()
    found_count: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    covered: Counter[str] = Counter()
    started = time.perf_counter()
    for item in items:
        text = item["text"]
        spans = find_pii(text)
        for span in spans:
            found_count[span.kind.value] += 1
        for gold in item["spans"]:
            kind = gold["type"]
            gold_count[kind] += 1
            same_type = [
                span
                for span in spans
                if span.kind.value == kind and span.start < gold["end"] and gold["start"] < span.end
            ]
            if same_type:
                hits[kind] += 1
            elif args.errors:
                print(
                    f"  miss {item['id']} {kind}: {text[gold['start'] : gold['end']]!r} in {text!r}"
                )
            if any(span.start <= gold["start"] and gold["end"] <= span.end for span in spans):
                covered[kind] += 1
        if args.errors:
            for span in spans:
                labelled = any(
                    gold["type"] == span.kind.value
                    and span.start < gold["end"]
                    and gold["start"] < span.end
                    for gold in item["spans"]
                )
                if not labelled:
                    print(
                        f"  false {item['id']} {span.kind.value}: {text[span.start : span.end]!r}"
                    )
    elapsed = time.perf_counter() - started

    print(f"{len(items)} lines, {sum(gold_count.values())} labelled spans")
    print(f"{'type':10} {'n':>4} {'recall':>7} {'precision':>9} {'covered':>8}  target")
    for kind in [member.value for member in PiiType]:
        count = gold_count[kind]
        recall = hits[kind] / count if count else float("nan")
        precision = hits[kind] / found_count[kind] if found_count[kind] else float("nan")
        coverage = covered[kind] / count if count else float("nan")
        target = "recall >= 0.99" if kind in TARGETS else "recall >= 0.8 (best effort)"
        met = recall >= (0.99 if kind in TARGETS else 0.8)
        print(
            f"{kind:10} {count:4d} {recall:7.3f} {precision:9.3f} {coverage:8.3f}  "
            f"{target}: {'met' if met else 'MISSED'}"
        )
    print(f"scrubbing time: {elapsed / len(items) * 1000:.3f} ms per line")


if __name__ == "__main__":
    main()
