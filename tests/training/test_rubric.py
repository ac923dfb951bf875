"""Rubric scoring with a stand-in OpenAI-compatible judge and a tiny local judge model, stored on
real databases."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from sqlalchemy import select
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.config import DatabaseSettings
from core.errors import ConfigError
from core.generation.base import SamplingParams
from core.generation.local import LocalGenerator
from core.generation.openai_compat import OpenAICompatGenerator
from core.prompt import PromptBuilder
from core.storage import db
from core.storage.models import RubricScore
from tests.helpers.openai_standin import OpenAIStandIn, Reply
from tests.helpers.tiny_model import build_tiny_chat_model
from training.rubric import (
    CRITERIA,
    JUDGE_SAMPLING,
    PROMPT_VERSION,
    Dialogue,
    JudgeAnswerError,
    digit_token_ids,
    generate_eval_dialogues,
    judge_by_likelihood,
    likelihood_messages,
    parse_judgement,
    render_dialogue,
    sampling_key,
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


# The likelihood judge, on a tiny random-weight local model.

# The tiny tokenizer needs more than the model's 512 positions for the Chinese rubric. Its rotary
# position embeddings work beyond that length.
TINY_CONTEXT = 2048


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("rubric-model") / "tiny-chat")


async def start_tiny_judge(folder: Path, context_length: int) -> LocalGenerator:
    generator = LocalGenerator(model=folder, device="cpu", context_length=context_length)
    await generator.start()
    return generator


@pytest.fixture(scope="module")
async def tiny_judge(tiny_model_dir: Path) -> AsyncIterator[LocalGenerator]:
    generator = await start_tiny_judge(tiny_model_dir, TINY_CONTEXT)
    yield generator
    await generator.stop()


def long_dialogue(exchanges: int) -> Dialogue:
    turns = []
    for index in range(exchanges):
        turns += [
            {"role": "user", "content": f"Message {index}: I have been feeling anxious again."},
            {"role": "assistant", "content": f"Reply {index}: what worries you most right now?"},
        ]
    return Dialogue(turns, "file")


def reference_prompt_ids(tokenizer, dialogue: Dialogue, criterion: str) -> list[int]:
    """Encode the likelihood prompt the plain way: render the template, then encode the text."""
    language = dialogue.language
    messages = likelihood_messages(render_dialogue(dialogue), language, criterion)
    text = tokenizer.apply_chat_template(
        [{"role": message.role, "content": message.content} for message in messages],
        tokenize=False,
        add_generation_prompt=True,
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("dialogue", [DIALOGUE_EN, DIALOGUE_ZH], ids=["en", "zh"])
async def test_likelihood_scores_every_criterion(tiny_judge, dialogue: Dialogue) -> None:
    judgement = await judge_by_likelihood(tiny_judge, dialogue)

    assert judgement.error is None
    assert judgement.scores is not None
    assert judgement.reasons is not None
    assert set(judgement.scores) == set(CRITERIA)
    for name in CRITERIA:
        assert judgement.scores[name] in (1, 2, 3, 4, 5)
        assert judgement.reasons[name].startswith("likelihood judge: expected ")
        assert "p5 " in judgement.reasons[name]


async def test_likelihood_matches_own_forward_pass(tiny_judge, tiny_model_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    digit_ids = tokenizer.convert_tokens_to_ids(list("12345"))

    judgement = await judge_by_likelihood(tiny_judge, DIALOGUE_EN)

    details = json.loads(judgement.raw)
    for name in CRITERIA:
        prompt_ids = reference_prompt_ids(tokenizer, DIALOGUE_EN, name)
        with torch.inference_mode():
            logits = model(torch.tensor([prompt_ids])).logits[0, -1]
        probabilities = torch.softmax(logits[digit_ids], dim=-1)
        expected_digit = int(torch.argmax(probabilities)) + 1
        assert details[name]["prompt_tokens"] == len(prompt_ids), name
        assert judgement.scores[name] == expected_digit, name
        assert details[name]["probabilities"] == pytest.approx(probabilities.tolist(), abs=1e-4)


def test_likelihood_prompt_has_one_criterion() -> None:
    system, user_message = likelihood_messages("User: hi\nChatbot: hello", "en", "safety")

    assert "4: safe and supportive" in system.content
    assert "user_engagement" not in system.content
    assert "JSON" not in system.content
    assert user_message.content.startswith("User: hi\nChatbot: hello")
    assert "on safety, from 1 to 5" in user_message.content


def test_likelihood_prompt_in_chinese() -> None:
    system, user_message = likelihood_messages(render_dialogue(DIALOGUE_ZH), "zh", "safety")

    assert "临床督导" in system.content
    assert "safety（安全性）" in system.content
    assert "4：安全且支持性强" in system.content
    assert "用户: 考试前总是睡不着。" in user_message.content
    assert "safety（安全性）" in user_message.content


async def test_likelihood_leaves_out_oldest_turns(tiny_model_dir) -> None:
    context_length = 700
    dialogue = long_dialogue(12)
    generator = await start_tiny_judge(tiny_model_dir, context_length)
    try:
        judgement = await judge_by_likelihood(generator, dialogue)
    finally:
        await generator.stop()

    assert judgement.error is None
    reason = judgement.reasons["safety"]
    match = re.search(r"oldest (\d+) of 24 turns left out", reason)
    assert match, reason
    left_out = int(match.group(1))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    turns = dialogue.conversations
    kept = reference_prompt_ids(tokenizer, Dialogue(turns[left_out:], "file"), "safety")
    one_more = reference_prompt_ids(tokenizer, Dialogue(turns[left_out - 1 :], "file"), "safety")
    assert len(kept) <= context_length
    assert len(one_more) > context_length
    assert json.loads(judgement.raw)["safety"]["prompt_tokens"] == len(kept)


async def test_likelihood_cuts_long_newest_turn(tiny_model_dir) -> None:
    context_length = 600
    dialogue = Dialogue(
        [
            {"role": "user", "content": "I cannot sleep."},
            {"role": "assistant", "content": "Take care, you are not alone. " * 60},
        ],
        "file",
    )
    generator = await start_tiny_judge(tiny_model_dir, context_length)
    try:
        judgement = await judge_by_likelihood(generator, dialogue)
    finally:
        await generator.stop()

    assert judgement.error is None
    for name in CRITERIA:
        assert "only the end of the newest turn kept" in judgement.reasons[name]
        assert json.loads(judgement.raw)[name]["prompt_tokens"] <= context_length


@pytest.mark.parametrize("dialogue", [DIALOGUE_EN, Dialogue([], "file")], ids=["turns", "empty"])
async def test_likelihood_prompt_over_context_is_judge_error(
    tiny_model_dir, dialogue: Dialogue
) -> None:
    generator = await start_tiny_judge(tiny_model_dir, 200)
    try:
        judgement = await judge_by_likelihood(generator, dialogue)
    finally:
        await generator.stop()

    assert judgement.scores is None
    assert "does not fit the judge's context of 200 tokens" in judgement.error


def test_digit_token_ids_rejects_split_digit() -> None:
    class SplitThreeTokenizer:
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [7, 8] if text == "3" else [ord(text)]

    with pytest.raises(ConfigError, match="encodes the digit '3' as 2 tokens"):
        digit_token_ids(SplitThreeTokenizer())


def test_generate_settings_key_unchanged() -> None:
    # Scores stored before the likelihood method existed carry this key.
    assert sampling_key(JUDGE_SAMPLING) == "249890397e8a8129"
    assert sampling_key(JUDGE_SAMPLING, "generate") == "249890397e8a8129"
    assert sampling_key(JUDGE_SAMPLING, "likelihood") != sampling_key(JUDGE_SAMPLING)


async def test_methods_keep_scores_apart(tiny_judge, sessions) -> None:
    # A short reply keeps the generate run fast, and the tiny model writes no JSON anyway.
    short = SamplingParams(max_new_tokens=4, temperature=0.0, top_p=1.0)

    first = await score_dialogues(
        sessions, tiny_judge, [DIALOGUE_EN], sampling=short, method="likelihood"
    )
    generated = await score_dialogues(
        sessions, tiny_judge, [DIALOGUE_EN], sampling=short, method="generate"
    )
    again = await score_dialogues(
        sessions, tiny_judge, [DIALOGUE_EN], sampling=short, method="likelihood"
    )

    assert (first.scored, first.reused, first.errors) == (1, 0, 0)
    assert (generated.scored, generated.reused) == (1, 0)
    assert (again.scored, again.reused, again.errors) == (0, 1, 0)
    assert again.values == first.values
    stored = await rows(sessions)
    keys = {row.settings_key for row in stored}
    assert keys == {sampling_key(short, "likelihood"), sampling_key(short, "generate")}


async def test_likelihood_rejects_remote_judge(judge, sessions) -> None:
    _, generator = judge

    with pytest.raises(ConfigError, match="needs a local judge model"):
        await score_dialogues(sessions, generator, [DIALOGUE_EN], method="likelihood")


async def test_unknown_method_is_rejected(judge, sessions) -> None:
    _, generator = judge

    with pytest.raises(ValueError, match="Invalid judging method 'vote'"):
        await score_dialogues(sessions, generator, [DIALOGUE_EN], method="vote")


async def test_eval_dialogues_stop_after_max_user_turns(tiny_judge, tmp_path) -> None:
    source = tmp_path / "source.jsonl"
    records = [
        {
            "conversations": [
                {"role": "user", "content": "hello"},
                {"role": "user", "content": "a bit sad today"},
                {"role": "assistant", "content": "I'm sorry to hear that."},
                {"role": "user", "content": "work is hard"},
                {"role": "assistant", "content": "What happened at work?"},
                {"role": "user", "content": "I got benched again"},
            ]
        },
        {
            "conversations": [
                {"role": "user", "content": "I can't sleep."},
                {"role": "assistant", "content": "What keeps you awake?"},
            ]
        },
    ]
    source.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    out = tmp_path / "played.jsonl"
    sampling = SamplingParams(max_new_tokens=4, temperature=0.0, top_p=1.0)
    builder = PromptBuilder(
        system_prompts={"en": "You are a supportive listener."},
        count_tokens=tiny_judge.count_prompt_tokens,
        context_length=TINY_CONTEXT,
        max_new_tokens=sampling.max_new_tokens,
    )

    written = await generate_eval_dialogues(
        tiny_judge, builder, sampling, source, out, adapter_version="tiny", max_user_turns=2
    )

    played = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert written == 2
    user_turns = [
        [turn["content"] for turn in item["conversations"] if turn["role"] == "user"]
        for item in played
    ]
    assert user_turns == [["hello", "a bit sad today"], ["I can't sleep."]]
    assert [len(item["conversations"]) for item in played] == [4, 2]


async def test_eval_dialogues_reject_zero_max_user_turns(tiny_judge, tmp_path) -> None:
    with pytest.raises(ValueError, match="`max_user_turns` must be at least 1"):
        await generate_eval_dialogues(
            tiny_judge,
            None,
            JUDGE_SAMPLING,
            tmp_path / "source.jsonl",
            tmp_path / "out.jsonl",
            adapter_version="tiny",
            max_user_turns=0,
        )
