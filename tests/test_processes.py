"""Real processes: two schedulers share one job lease; a killed export leaves no whole file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from core.config import PROJECT_ROOT
from core.storage import db

RUN_LOCKED = textwrap.dedent(
    """
    import asyncio, sys
    from core.config import DatabaseSettings
    from core.scheduler import run_locked
    from core.storage import db

    async def main(url, marker):
        engine = db.create_engine(DatabaseSettings(url=url))

        async def job():
            with open(marker, "a") as file:
                file.write("run\\n")
            await asyncio.sleep(1.0)

        outcome = await run_locked(db.create_session_factory(engine), "export", job, timeout_s=30)
        await engine.dispose()
        print(outcome)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)

SLOW_EXPORT = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from core.config import DatabaseSettings
    from core.privacy import export
    from core.pseudonym import Pseudonymizer
    from core.storage import db

    original = export._write

    def slow_write(*args):
        original(*args)
        time.sleep(0.01)

    export._write = slow_write

    async def main(url, out_dir):
        engine = db.create_engine(DatabaseSettings(url=url))
        await export.export_conversations(
            db.create_session_factory(engine),
            out_dir=Path(out_dir),
            pseudonyms=Pseudonymizer(b"kill-test-key-0123456789abcdef"),
        )

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


def python(script: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_scheduler_processes_run_a_job_once(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'locks.db'}"
    db.upgrade(url)
    marker = tmp_path / "runs.txt"

    processes = [python(RUN_LOCKED, url, str(marker)) for _ in range(2)]
    outcomes = sorted(process.communicate(timeout=60)[0].strip() for process in processes)

    assert outcomes == ["done", "skipped"]
    assert marker.read_text().splitlines() == ["run"]


def test_killed_export_leaves_no_complete_looking_file(tmp_path: Path) -> None:
    import sqlite3

    url = f"sqlite+aiosqlite:///{tmp_path / 'kill.db'}"
    db.upgrade(url)
    now = "2026-12-01 10:00:00.000000"
    with sqlite3.connect(tmp_path / "kill.db") as connection:
        connection.executemany(
            "INSERT INTO users (id, platform, platform_user_id, training_consent, created_at,"
            " updated_at) VALUES (?, 'telegram', ?, 1, ?, ?)",
            [(index, str(index), now, now) for index in range(1, 501)],
        )
        connection.executemany(
            "INSERT INTO conversations (id, user_id, platform_chat_id, opened_at)"
            " VALUES (?, ?, ?, ?)",
            [(index, index, str(index), now) for index in range(1, 501)],
        )
        connection.executemany(
            "INSERT INTO turns (conversation_id, user_id, role, content, platform_chat_id,"
            " revision, created_at) VALUES (?, ?, ?, ?, ?, 0, ?)",
            [
                (index, index, role, f"{role} text {index}", str(index), now)
                for index in range(1, 501)
                for role in ("user", "assistant")
            ],
        )
    out_dir = tmp_path / "exports"

    process = python(SLOW_EXPORT, url, str(out_dir))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not list(out_dir.glob("*.partial")):
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)

    names = [path.name for path in out_dir.iterdir()]
    assert names, "the export had started writing"
    assert all(name.endswith(".partial") for name in names)
    partial = next(out_dir.glob("*.partial"))
    assert 0 < len(partial.read_text(encoding="utf-8").splitlines()) < 500
