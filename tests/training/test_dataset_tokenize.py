"""Dataset building and training tokenisation (label masking and truncation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.tiny_model import build_tiny_tokenizer
from training.dataset import build_dataset, validate
from training.tokenize import IGNORE_INDEX, build_samples

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def write_jsonl(path: Path, items: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(item, ensure_ascii=False) for item in items) + "\n")
    return path


def dialogue(*texts: str, system: str | None = None) -> dict:
    turns = [{"role": "system", "content": system}] if system else []
    for index, text in enumerate(texts):
        turns.append({"role": "user" if index % 2 == 0 else "assistant", "content": text})
    return {"conversations": turns}


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        ({"conversations": [{"role": "bot", "content": "x"}]}, "unknown role"),
        (dialogue("hi", ""), "empty content"),
        (
            {"conversations": [{"role": "assistant", "content": "hello there"}]},
            "no complete exchange",
        ),
        (
            {
                "conversations": [
                    {"role": "user", "content": "hi"},
                    {"role": "system", "content": "be brief"},
                ]
            },
            "system turn after the start",
        ),
        (dialogue("only a question"), "no complete exchange"),
        (dialogue("hi", "ok"), "near-empty"),
        ("not an object", "no conversations list"),
    ],
)
def test_invalid_dialogues_have_reasons(item: object, reason: str) -> None:
    turns, found = validate(item)
    assert turns is None
    assert found == reason


def test_consecutive_turns_of_one_role_are_merged() -> None:
    item = {
        "conversations": [
            {"role": "assistant", "content": "Welcome, how can I help?"},
            {"role": "user", "content": "hi"},
            {"role": "user", "content": "are you there?"},
            {"role": "assistant", "content": "I'm here, what's up?"},
        ]
    }

    turns, reason = validate(item)

    assert reason is None
    assert turns == [
        {"role": "user", "content": "hi\nare you there?"},
        {"role": "assistant", "content": "I'm here, what's up?"},
    ]


def test_trailing_user_turn_is_dropped() -> None:
    turns, reason = validate(dialogue("hi", "hello, how are you today?", "fine"))
    assert reason is None
    assert [turn["role"] for turn in turns] == ["user", "assistant"]


def test_build_dedupes_applies_tombstones_and_splits(tmp_path: Path) -> None:
    english = [dialogue(f"question {i}", f"a helpful answer number {i}") for i in range(60)]
    chinese = [dialogue(f"问题{i}", f"这是第{i}个有帮助的回答") for i in range(20)]
    export = [
        {**dialogue("from the export", "an answer from the export"), "user": "u-keep"},
        {**dialogue("deleted user", "an answer they asked to delete"), "user": "u-gone"},
    ]
    sources = [
        ("en", write_jsonl(tmp_path / "en.jsonl", english + english[:5])),
        ("zh", write_jsonl(tmp_path / "zh.jsonl", [*chinese, dialogue("hi")])),
        ("export", write_jsonl(tmp_path / "export.jsonl", export)),
    ]

    report = build_dataset(
        sources,
        tmp_path / "dataset",
        tombstones={"u-gone"},
        language_ratios={"en": 0.5, "zh": 0.5},
    )

    assert report.dropped["duplicate"] == 5
    assert report.dropped["tombstoned"] == 1
    assert report.dropped["no complete exchange"] == 1
    written = {
        name: [json.loads(line) for line in (tmp_path / "dataset" / f"{name}.jsonl").open()]
        for name in ("train", "validation", "test")
    }
    every = [item for items in written.values() for item in items]
    assert report.stats["zh"]["dialogues"] == report.stats["en"]["dialogues"] == 20
    assert len(every) == 40
    assert "an answer they asked to delete" not in json.dumps(every)
    manifest = json.loads((tmp_path / "dataset" / "manifest.json").read_text())
    assert manifest["splits"] == {name: len(items) for name, items in written.items() if items}
    # The split follows the dialogue, so a second build puts every dialogue in the same file.
    build_dataset(
        sources, tmp_path / "again", tombstones={"u-gone"}, language_ratios={"en": 0.5, "zh": 0.5}
    )
    for name in ("train", "validation", "test"):
        assert (tmp_path / "again" / f"{name}.jsonl").read_text() == (
            tmp_path / "dataset" / f"{name}.jsonl"
        ).read_text()


def test_build_keeps_longest_exported_copy(tmp_path: Path) -> None:
    first = dialogue("I can't sleep", "That sounds exhausting. Since when?")
    longer = dialogue(
        "I can't sleep", "That sounds exhausting. Since when?", "Two weeks", "What changed then?"
    )
    # Same opening question, another answer: a different dialogue, kept.
    other = dialogue("I can't sleep", "Tell me about your evenings.")
    sources = [
        ("export", write_jsonl(tmp_path / "export-1.jsonl", [{**first, "user": "u-1"}, other])),
        ("export", write_jsonl(tmp_path / "export-2.jsonl", [{**longer, "user": "u-1"}])),
    ]

    report = build_dataset(sources, tmp_path / "dataset")

    assert report.dropped["beginning of a longer dialogue"] == 1
    assert report.kept["export"] == 2
    written = [
        json.loads(line)["conversations"]
        for name in ("train", "validation", "test")
        for line in (tmp_path / "dataset" / f"{name}.jsonl").open()
    ]
    assert len(written) == 2
    assert longer["conversations"] in written
    assert other["conversations"] in written


def labelled_text(tokenizer, sample) -> list[str]:
    """Return the labelled runs of a sample, decoded."""
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(tokenizer.decode(current))
                current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_golden_labels_of_a_known_dialogue(tokenizer) -> None:
    conversation = dialogue(
        "I can't sleep.", "What keeps you awake?", "Exams.", "That is hard.", system="Be kind."
    )["conversations"]

    [sample] = build_samples(tokenizer, conversation, max_length=512)

    assert labelled_text(tokenizer, sample) == [
        f"What keeps you awake?{IM_END}",
        f"That is hard.{IM_END}",
    ]
    text = tokenizer.decode(sample.input_ids)
    assert text.startswith("<|im_start|>system\nBe kind.")
    assert text.endswith(f"That is hard.{IM_END}")
    assert sample.labels[-1] == tokenizer.convert_tokens_to_ids(IM_END)
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert rendered.startswith(tokenizer.decode(sample.input_ids))


def test_long_dialogue_is_split_at_exchanges(tokenizer) -> None:
    texts = []
    for index in range(6):
        texts += [f"question {index} " + "word " * 20, f"answer {index} " + "word " * 20]
    conversation = dialogue(*texts)["conversations"]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    full = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])

    samples = build_samples(tokenizer, conversation, max_length=full // 2)

    assert len(samples) >= 2
    seen_answers = []
    for sample in samples:
        assert len(sample.input_ids) <= full // 2
        assert sample.labels[-1] == tokenizer.convert_tokens_to_ids(IM_END)
        runs = labelled_text(tokenizer, sample)
        assert runs
        seen_answers += [run.split()[1] for run in runs]
    assert seen_answers == [str(index) for index in range(6)]


def test_exchange_longer_than_limit_is_left_out(tokenizer) -> None:
    conversation = dialogue("short", "a short answer", "long " * 200, "an answer")["conversations"]

    samples = build_samples(tokenizer, conversation, max_length=60)

    assert [labelled_text(tokenizer, sample) for sample in samples] == [[f"a short answer{IM_END}"]]
    assert build_samples(tokenizer, conversation[2:], max_length=60) == []
