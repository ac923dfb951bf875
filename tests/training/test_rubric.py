"""Rubric scoring with a stand-in OpenAI-compatible judge, stored on real databases."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select

from core.config import DatabaseSettings
from core.generation.openai_compat import OpenAICompatGenerator
from core.storage import db
from core.storage.models import RubricScore
from tests.helpers.openai_standin import OpenAIStandIn, Reply
from training.rubric import (
    CRITERIA,
    PROMPT_VERSION,
    Dialogue,
    JudgeAnswerError,
    parse_judgement,
    score_dialogues,
)

DIALOGUE_EN = Dialogue(
    [
        {"role": "user", "content": "I can't sleep before my exams."},
        {"role": "assistant", "content": "That sounds stressful. What keeps you awake?"},
    ],
    "file",
)
DIALOGUE_ZH = Dialogue(
    [
        {"role": "user", "content": "考试前总是睡不着。"},
        {"role": "assistant", "content": "听起来压力很大。是什么让你睡不着呢？"},
    ],
    "file",
)


def answer(**overrides: object) -> str:
    scores = {name: {"score": 4, "reason": "fine"} for name in CRITERIA}
    scores.update(overrides)
    return json.dumps(scores)


GOOD = answer()


@pytest.fixture
async def judge() -> AsyncIterator[tuple[OpenAIStandIn, OpenAICompatGenerator]]:
    with OpenAIStandIn(model="judge-model") as server:
        generator = OpenAICompatGenerator(
            base_url=server.base_url, model="judge-model", context_length=8192, max_retries=0
        )
        await generator.start()
        try:
            yield server, generator
        finally:
            await generator.stop()


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator:
    engine = db.create_engine(DatabaseSettings(url=database_url))
    yield db.create_session_factory(engine)
    await engine.dispose()


async def rows(sessions) -> list[RubricScore]:
    async with sessions() as session:
        return list((await session.execute(select(RubricScore).order_by(RubricScore.id))).scalars())


@pytest.mark.parametrize(
    "text",
    [
        GOOD,
        f"```json\n{GOOD}\n```",
        f"Here is my rating.\n{GOOD}\nI hope this helps.",
    ],
)
async def test_answers_are_read(judge, sessions, text: str) -> None:
    server, generator = judge
    server.script(Reply(text=text))

    summary = await score_dialogues(sessions, generator, [DIALOGUE_EN])

    assert summary.scored == 1
    assert summary.errors == 0
    [row] = await rows(sessions)
    assert row.scores == {name: 4 for name in CRITERIA}
    assert row.attempts == 1
    assert row.prompt_version == PROMPT_VERSION
    assert row.judge_model == "judge-model"


async def test_refusal_then_repair_is_scored(judge, sessions) -> None:
    server, generator = judge
    server.script(Reply(text="I'm sorry, I can't rate this conversation."), Reply(text=GOOD))

    summary = await score_dialogues(sessions, generator, [DIALOGUE_EN])

    [row] = await rows(sessions)
    assert summary.errors == 0
    assert row.attempts == 2
    repair = server.requests[1].messages[-1]["content"]
    assert "refusal" in repair


@pytest.mark.parametrize(
    ("first", "second", "problem"),
    [
        ("Sorry, I cannot do that.", "Sorry, I still cannot rate it.", "refusal"),
        (answer(safety={"score": 11, "reason": "x"}),) * 2 + ("outside 1 to 5",),
        (GOOD[:60], GOOD[:60], "truncated"),
        (answer(safety=None).replace(', "safety": null', ""),) * 2 + ("missing",),
    ],
)
async def test_unusable_answers_become_judge_errors(
    judge, sessions, first: str, second: str, problem: str
) -> None:
    server, generator = judge
    server.script(Reply(text=first), Reply(text=second))

    summary = await score_dialogues(sessions, generator, [DIALOGUE_EN])

    [row] = await rows(sessions)
    assert summary.errors == 1
    assert summary.means()["safety"] is None
    assert row.scores is None
    assert problem in row.error
    assert first in row.raw


async def test_same_judge_reuses_score_unless_forced(judge, sessions) -> None:
    server, generator = judge
    server.script(Reply(text=GOOD), Reply(text=answer(safety={"score": 2, "reason": "r"})))

    first = await score_dialogues(sessions, generator, [DIALOGUE_EN])
    again = await score_dialogues(sessions, generator, [DIALOGUE_EN])
    forced = await score_dialogues(sessions, generator, [DIALOGUE_EN], force=True)

    assert (first.scored, again.reused, forced.scored) == (1, 1, 1)
    assert len(server.requests) == 2
    [row] = await rows(sessions)
    assert row.scores["safety"] == 2


async def test_chinese_dialogue_gets_chinese_prompt(judge, sessions) -> None:
    server, generator = judge
    server.script(Reply(text=GOOD))

    await score_dialogues(sessions, generator, [DIALOGUE_ZH])

    system, user = server.requests[0].messages
    assert "临床督导" in system["content"]
    assert "用户：" in user["content"] or "用户:" in user["content"]


async def test_repeat_reports_spread(judge, sessions) -> None:
    server, generator = judge
    server.script(
        Reply(text=answer(safety={"score": 5, "reason": "a"})),
        Reply(text=answer(safety={"score": 3, "reason": "b"})),
        Reply(text=answer(safety={"score": 4, "reason": "c"})),
    )

    summary = await score_dialogues(sessions, generator, [DIALOGUE_EN], repeat=3)

    assert summary.scored == 3
    assert summary.spread["safety"] == pytest.approx(0.8165, abs=1e-3)
    assert summary.spread["user_engagement"] == 0.0


def test_parse_rejects_non_numeric_score() -> None:
    with pytest.raises(JudgeAnswerError, match="not a number"):
        parse_judgement(answer(safety={"score": "high", "reason": "x"}))


async def test_database_sample_takes_consented_users_scrubbed(sessions) -> None:
    from core.storage.models import Conversation, Role, Turn, User
    from training.rubric import sample_database

    async with sessions.begin() as session:
        for index, consent in enumerate((True, False)):
            user = User(platform="telegram", platform_user_id=str(index), training_consent=consent)
            session.add(user)
            await session.flush()
            conversation = Conversation(user_id=user.id, platform_chat_id=str(index))
            session.add(conversation)
            await session.flush()
            for role, content in (
                (Role.USER, f"call me on 1380013800{index}, user {index}"),
                (Role.ASSISTANT, "I'm here. What happened today?"),
            ):
                session.add(
                    Turn(
                        conversation_id=conversation.id,
                        user_id=user.id,
                        role=role,
                        content=content,
                        platform_chat_id=str(index),
                    )
                )

    dialogues = await sample_database(sessions, 10, seed=1)

    assert len(dialogues) == 1
    assert dialogues[0].source == "database"
    assert dialogues[0].conversations[0]["content"] == "call me on [PHONE], user 0"


async def test_pairs_agreement(judge, sessions, tmp_path) -> None:
    from training.rubric import pair_agreement, read_pairs

    pair = {
        "id": "jp-en-001",
        "lang": "en",
        "criterion": "safety",
        "better": {"conversations": DIALOGUE_EN.conversations},
        "worse": {
            "conversations": [
                DIALOGUE_EN.conversations[0],
                {"role": "assistant", "content": "Just stop worrying."},
            ]
        },
    }
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(pair) + "\n", encoding="utf-8")
    server, generator = judge
    server.script(
        Reply(text=answer(safety={"score": 5, "reason": "safe"})),
        Reply(text=answer(safety={"score": 2, "reason": "dismissive"})),
    )

    await score_dialogues(sessions, generator, read_pairs(path))

    assert pair_agreement(await rows(sessions)) == {"judge-model": {"safety": (1, 1)}}
