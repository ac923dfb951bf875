"""Shared parts of the end-to-end platform benchmarks: reply latencies and the result line."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def collect_replies(
    replies: Callable[[], Sequence[Any]],
    chat_of: Callable[[Any], int],
    queued: dict[int, list[float]],
    started: float,
    *,
    timeout_s: float = 300,
) -> None:
    """Wait for one reply per queued message and print the result as one JSON line.

    ``replies`` returns the bot's replies so far, oldest first; the n-th reply
    in a chat answers the n-th message queued there.
    """
    total = sum(len(times) for times in queued.values())
    latencies: list[float] = []
    answered = dict.fromkeys(queued, 0)
    seen = 0
    deadline = started + timeout_s
    while seen < total and time.perf_counter() < deadline:
        current = replies()
        now = time.perf_counter()
        for message in current[seen:]:
            chat = chat_of(message)
            index = answered[chat]
            latencies.append(now - queued[chat][index])
            answered[chat] = index + 1
        seen = len(current)
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - started

    result = {
        "replies": seen,
        "total": total,
        "elapsed": elapsed,
        "p50": statistics.median(latencies) if latencies else None,
        "p99": percentile(latencies, 0.99) if latencies else None,
    }
    print(json.dumps(result), flush=True)


async def serve_until_stdin_closes() -> None:
    """Keep the stand-in serving until the bot, in the parent process, has stopped."""
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def describe(users: int, messages: int, result: dict[str, Any]) -> str:
    rate = result["replies"] / result["elapsed"]
    return (
        f"{users} users x {messages} messages: {result['replies']} of {result['total']} "
        f"replies in {result['elapsed']:.2f} s, {rate:.0f} messages/s; "
        f"latency p50 {result['p50'] * 1000:.0f} ms, p99 {result['p99'] * 1000:.0f} ms "
        "(target: at least 200 messages/s)"
    )
