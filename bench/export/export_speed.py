"""Benchmark `mindharbor export` on SQLite: turns per second and peak memory.

Seeds a fresh SQLite file with N turns (consented users, 20 turns per
conversation, half of them user turns with a phone number or e-mail to
scrub), then exports them once. Targets: at least 20,000 turns/s and peak
memory under 300 MB that does not grow with N.
Run: python bench/export/export_speed.py [--turns 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import resource
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from core.config import DatabaseSettings  # noqa: E402
from core.privacy.export import export_conversations  # noqa: E402
from core.pseudonym import Pseudonymizer  # noqa: E402
from core.storage import db  # noqa: E402

TURNS_PER_CONVERSATION = 20


def seed(path: Path, turns: int) -> None:
    conversations = turns // TURNS_PER_CONVERSATION
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    with sqlite3.connect(path) as connection:
        connection.executemany(
            "INSERT INTO users (id, platform, platform_user_id, training_consent, created_at,"
            " updated_at) VALUES (?, 'telegram', ?, 1, ?, ?)",
            ((index, str(100000 + index), now, now) for index in range(1, conversations + 1)),
        )
        connection.executemany(
            "INSERT INTO conversations (id, user_id, platform_chat_id, opened_at)"
            " VALUES (?, ?, ?, ?)",
            ((index, index, str(index), now) for index in range(1, conversations + 1)),
        )

        def rows():
            turn_id = 0
            for conversation in range(1, conversations + 1):
                for position in range(TURNS_PER_CONVERSATION):
                    turn_id += 1
                    if position % 2 == 0:
                        role = "user"
                        if position % 4 == 0:
                            phone = f"1380013{turn_id % 10000:04d}"
                            content = f"I have been feeling low this week, call me on {phone}"
                        else:
                            content = (
                                "work was hard and I could not sleep, write to a@b.example.org"
                            )
                    else:
                        role = "assistant"
                        content = "That sounds exhausting. What has helped you rest before?"
                    yield (
                        turn_id,
                        conversation,
                        conversation,
                        role,
                        content,
                        str(conversation),
                        now,
                    )

        connection.executemany(
            "INSERT INTO turns (id, conversation_id, user_id, role, content, platform_chat_id,"
            " revision, created_at) VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
            rows(),
        )


async def run(turns: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.db"
        url = f"sqlite+aiosqlite:///{path}"
        await db.upgrade_async(url)
        started = time.perf_counter()
        seed(path, turns)
        print(f"seeded {turns:,} turns in {time.perf_counter() - started:.1f} s")

        engine = db.create_engine(DatabaseSettings(url=url))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        started = time.perf_counter()
        result = await export_conversations(
            db.create_session_factory(engine),
            out_dir=Path(folder) / "exports",
            pseudonyms=Pseudonymizer(b"bench-key-0123456789abcdef0123"),
        )
        elapsed = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        await engine.dispose()
        print(
            f"exported {result.dialogues:,} dialogues ({result.turns:,} turns after merging) "
            f"from {turns:,} stored turns in {elapsed:.1f} s: {turns / elapsed:,.0f} turns/s "
            "(target >= 20,000)"
        )
        print(
            f"peak memory (max RSS of this process): {peak:.0f} MB, {before:.0f} MB before the "
            "export (target < 300 MB)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=1_000_000)
    args = parser.parse_args()
    print(f"Python {sys.version.split()[0]}, {sys.platform}")
    asyncio.run(run(args.turns))


if __name__ == "__main__":
    main()
