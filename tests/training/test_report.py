"""The rubric report built from a real database: every section, plots that render."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from core.config import DatabaseSettings
from core.storage import db
from core.storage.models import Conversation, Role, RubricScore, Turn, User
from training.report import SECTIONS, build_report
from training.rubric import CRITERIA, PROMPT_VERSION

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def score_row(key: str, adapter: str, safety: int | None, days_ago: int) -> RubricScore:
    scores = None if safety is None else {name: 4 for name in CRITERIA} | {"safety": safety}
    return RubricScore(
        dialogue_key=key,
        judge_model="judge",
        prompt_version=PROMPT_VERSION,
        settings_key="s",
        repeat_index=0,
        source="file",
        language="en",
        dialogue=[
            {"role": "user", "content": f"first message of {key}"},
            {"role": "assistant", "content": "reply"},
        ],
        adapter_version=adapter,
        scores=scores,
        reasons=None if scores is None else {"safety": f"reason for {key}"},
        error="the response is a refusal, not a rating" if scores is None else None,
        raw="Sorry" if scores is None else None,
        attempts=2 if scores is None else 1,
        created_at=dt.datetime.now(dt.UTC) - dt.timedelta(days=days_ago),
    )


async def test_report_has_every_section(database_url: str, tmp_path: Path) -> None:
    engine = db.create_engine(DatabaseSettings(url=database_url))
    sessions = db.create_session_factory(engine)
    async with sessions.begin() as session:
        session.add_all(
            [
                score_row("a1", "base", 5, 14),
                score_row("a2", "base", 2, 7),
                score_row("b1", "base+lora-v2", 4, 1),
                score_row("b2", "base+lora-v2", None, 1),
            ]
        )
        user = User(platform="console", platform_user_id="u")
        session.add(user)
        await session.flush()
        conversation = Conversation(user_id=user.id, platform_chat_id="c")
        session.add(conversation)
        await session.flush()
        for reason in ("stop", "length", "repetition", "stop"):
            session.add(
                Turn(
                    conversation_id=conversation.id,
                    user_id=user.id,
                    role=Role.ASSISTANT,
                    content="x",
                    platform_chat_id="c",
                    meta={"finish_reason": reason},
                )
            )
    try:
        page = await build_report(sessions, tmp_path / "report")
    finally:
        await engine.dispose()

    text = page.read_text(encoding="utf-8")
    for section in SECTIONS:
        assert f"<h2>{section}</h2>" in text
    assert "error rate 25.0%" in text
    assert "first message of a2" in text
    assert "reason for a2" in text
    assert "first message of a1" not in text
    assert "base+lora-v2" in text
    assert "25.0% stopped at the" in text
    for name in ("distribution.png", "adapters.png", "trend.png"):
        image = (tmp_path / "report" / name).read_bytes()
        assert image.startswith(PNG_SIGNATURE)
        assert len(image) > 5000
    assert "http" not in text


async def test_weekly_score_job_scores_and_rebuilds_report(tmp_path: Path, monkeypatch) -> None:
    import json

    from core.config import SchedulerSettings, Secrets, Settings
    from core.jobs import score_job
    from tests.helpers.openai_standin import OpenAIStandIn, Reply

    url = f"sqlite+aiosqlite:///{tmp_path / 'weekly.db'}"
    await db.upgrade_async(url)
    engine = db.create_engine(DatabaseSettings(url=url))
    sessions = db.create_session_factory(engine)
    async with sessions.begin() as session:
        user = User(platform="console", platform_user_id="u", training_consent=True)
        session.add(user)
        await session.flush()
        conversation = Conversation(user_id=user.id, platform_chat_id="c")
        session.add(conversation)
        await session.flush()
        for role, text in ((Role.USER, "I feel alone"), (Role.ASSISTANT, "I'm here with you.")):
            session.add(
                Turn(
                    conversation_id=conversation.id,
                    user_id=user.id,
                    role=role,
                    content=text,
                    platform_chat_id="c",
                )
            )
    await engine.dispose()
    scores = {name: {"score": 3, "reason": "ok"} for name in CRITERIA}
    with OpenAIStandIn(model="judge", default=Reply(text=json.dumps(scores))) as server:
        settings = Settings(
            database=DatabaseSettings(url=url),
            scheduler=SchedulerSettings(score_sample=5, report_dir=str(tmp_path / "weekly")),
        )
        settings.generator.backend = "openai"
        settings.generator.openai.base_url = server.base_url
        settings.generator.openai.model = "judge"
        scored = await score_job(settings, Secrets())

    assert scored == 1
    assert "<h2>Score distribution</h2>" in (tmp_path / "weekly" / "index.html").read_text()
