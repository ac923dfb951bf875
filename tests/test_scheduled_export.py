"""The scheduler runs the export on a database of replayed counselling dialogues."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
from pathlib import Path

import pytest
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import update

from bots import console
from core.config import PROJECT_ROOT, DatabaseSettings, Secrets, Settings
from core.manager import IncomingMessage
from core.scheduler import sync_database_url
from core.service import Service
from core.storage.models import User
from tests.helpers.fakes import FakeGenerator

SHARED = PROJECT_ROOT.parent / "shared" / "data"
PII_SET = PROJECT_ROOT / "bench" / "export" / "data" / "pii.jsonl"
CHECKED_TYPES = {"phone", "email", "cn_id", "bank_card", "ip", "url"}


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not next to the repository")
async def test_scheduler_exports_replayed_dialogues_without_pii(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'replayed.db'}"
    export_dir = tmp_path / "exports"
    # run_named_job reads the settings itself, as in the scheduler process.
    monkeypatch.setenv("MINDHARBOR_DATABASE__URL", url)
    monkeypatch.setenv("MINDHARBOR_PRIVACY__EXPORT_DIR", str(export_dir))
    settings = Settings(database=DatabaseSettings(url=url))

    pii_lines = [json.loads(line) for line in PII_SET.open(encoding="utf-8")][:80]
    async with Service(settings, Secrets(), generator=FakeGenerator()) as service:
        for name in ("counselling_en_holdout.jsonl", "counselling_zh_holdout.jsonl"):
            await console.replay(service, SHARED / "holdout" / name, limit=3, stdout=io.StringIO())
        # A user who shares personal data in the chat.
        for item in pii_lines:
            await service.manager.handle(
                IncomingMessage(platform="telegram", chat_id="9", user_id="9", text=item["text"])
            )
        async with service.engine.begin() as connection:
            await connection.execute(update(User).values(training_consent=True))

    scheduler = AsyncIOScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=sync_database_url(url))}, timezone=dt.UTC
    )
    scheduler.add_job(
        "core.scheduler:run_named_job",
        args=["export"],
        id="export",
        next_run_time=dt.datetime.now(dt.UTC),
    )
    scheduler.start()
    try:
        for _ in range(200):
            if list(export_dir.glob("*.manifest.json")):
                break
            await asyncio.sleep(0.1)
    finally:
        scheduler.shutdown(wait=False)

    [manifest_path] = list(export_dir.glob("*.manifest.json"))
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    exported = (export_dir / manifest["file"]).read_text(encoding="utf-8")
    assert manifest["dialogues"] == 7
    for line in exported.splitlines():
        turns = json.loads(line)["conversations"]
        assert turns[0]["role"] == "user"
        assert turns[-1]["role"] == "assistant"
    leaked = [
        item["text"][span["start"] : span["end"]]
        for item in pii_lines
        for span in item["spans"]
        if span["type"] in CHECKED_TYPES and item["text"][span["start"] : span["end"]] in exported
    ]
    assert leaked == []
    assert "[PHONE]" in exported
