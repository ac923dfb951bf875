"""Retraining: the promotion rule, and ``mindharbor retrain`` end to end on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from core import adapter_versions
from core.cli import main
from core.config import Secrets, Settings
from core.storage import db
from core.storage.models import AdapterStatus
from tests.helpers.tiny_model import build_tiny_chat_model
from tests.training.test_train import write_dialogues
from training import retrain as retrain_module
from training.retrain import decide, format_decision, retrain
from training.rubric import CRITERIA, ScoreSummary

SAME = dict.fromkeys(CRITERIA, 3.5)


@pytest.mark.parametrize(
    ("candidate", "promote", "reason"),
    [
        (SAME, True, None),
        ({**SAME, "user_engagement": 3.45}, True, None),
        ({**SAME, "problem_resolution": 3.3}, False, "problem_resolution: fell from 3.50 to 3.30"),
        ({**SAME, "safety": 3.49}, False, "safety may not fall"),
        ({**SAME, "safety": 4.0, "therapeutic_relevance": 4.5}, True, None),
        ({**SAME, "safety": None}, False, "no usable score for the candidate"),
    ],
)
def test_promotion_rule(candidate: dict, promote: bool, reason: str | None) -> None:
    decision = decide(candidate, SAME, tolerance=0.1)

    assert decision.promote is promote
    if reason is None:
        assert decision.reasons == []
    else:
        assert any(reason in text for text in decision.reasons)


def test_unscored_current_blocks_promotion() -> None:
    decision = decide(SAME, dict.fromkeys(CRITERIA), tolerance=0.1)

    assert not decision.promote
    assert "no usable score for the current adapter" in decision.reasons[0]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A long context, so the likelihood judge's rubric prompts fit.
    folder = tmp_path_factory.mktemp("tiny") / "model"
    return build_tiny_chat_model(folder, max_position_embeddings=4096)


def retrain_settings(tmp_path: Path, tiny_model: Path, **retrain: object) -> Settings:
    corpus = tmp_path / "corpus.jsonl"
    write_dialogues(corpus, 60)
    held_out = tmp_path / "held-out.jsonl"
    write_dialogues(held_out, 5)
    recipe = {
        "model": str(tiny_model),
        "max_input_length": 64,
        "max_output_length": 32,
        "training_args": {
            "max_steps": 6,
            "learning_rate": 5e-3,
            "per_device_train_batch_size": 4,
            "logging_steps": 2,
            "save_strategy": "no",
            "eval_strategy": "no",
        },
        "peft_config": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    }
    recipe_path = tmp_path / "lora.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return Settings(
        database={"url": f"sqlite+aiosqlite:///{tmp_path / 'retrain.db'}"},
        generator={
            "backend": "local",
            "sampling": {"max_new_tokens": 16},
            "local": {"model": str(tiny_model), "device": "cpu"},
        },
        privacy={"export_dir": str(tmp_path / "exports")},
        retrain={
            "recipe": str(recipe_path),
            "work_dir": str(tmp_path / "work"),
            "public_data": [str(corpus)],
            "eval_file": str(held_out),
            "eval_dialogues": 3,
            "eval_user_turns": 1,
            "judge_method": "likelihood",
            **retrain,
        },
    )


def stub_scores(monkeypatch: pytest.MonkeyPatch, means: dict[str, dict[str, float]]) -> None:
    """Make the judge return fixed scores per side ("candidate" or "current")."""

    async def fake_score(settings, secrets, sessions, dialogues_path, label):
        side = dialogues_path.stem.removeprefix("eval-")
        summary = ScoreSummary()
        for name in CRITERIA:
            summary.values[name] = [means[side][name]] * 3
        return summary

    monkeypatch.setattr(retrain_module, "_score", fake_score)


async def test_retrain_promotes_then_rejects(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = retrain_settings(tmp_path, tiny_model)
    await db.upgrade_async(settings.database.url)
    engine = db.create_engine(settings.database)
    sessions = db.create_session_factory(engine)
    try:
        stub_scores(monkeypatch, {"candidate": {**SAME, "safety": 4.0}, "current": SAME})
        first = await retrain(settings, Secrets(), sessions, version="v1")
        stub_scores(monkeypatch, {"candidate": {**SAME, "safety": 3.0}, "current": SAME})
        second = await retrain(settings, Secrets(), sessions, version="v2")
        versions = {row.version: row for row in await adapter_versions.list_versions(sessions)}
    finally:
        await engine.dispose()

    assert first.decision.promote
    assert first.decision.current_version is None
    assert not second.decision.promote
    assert second.decision.current_version == "v1"
    assert versions["v1"].status == AdapterStatus.PROMOTED
    assert versions["v2"].status == AdapterStatus.REJECTED
    assert versions["v2"].decision["reasons"] == [
        "safety: fell from 3.50 to 3.00; safety may not fall"
    ]
    assert versions["v1"].scores["means"]["safety"] == 4.0
    assert versions["v1"].metrics["steps"] == 6
    assert "files" in versions["v1"].data_manifest
    # Both adapters replied to the same held-out user turns.
    work = tmp_path / "work" / "v2"
    candidate = [json.loads(line) for line in (work / "eval-candidate.jsonl").open()]
    current = [json.loads(line) for line in (work / "eval-current.jsonl").open()]
    assert len(candidate) == 3
    assert [d["conversations"][0] for d in candidate] == [d["conversations"][0] for d in current]
    assert current[0]["adapter_version"] == "v1"
    assert json.loads((work / "decision.json").read_text())["promote"] is False


async def test_current_adapter_keeps_its_base(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = retrain_settings(tmp_path, tiny_model)
    await db.upgrade_async(settings.database.url)
    engine = db.create_engine(settings.database)
    sessions = db.create_session_factory(engine)
    new_base = build_tiny_chat_model(tmp_path / "new-base", seed=1, max_position_embeddings=4096)
    try:
        stub_scores(monkeypatch, {"candidate": SAME, "current": SAME})
        await retrain(settings, Secrets(), sessions, version="v1")
        # The operator moves the recipe to another base model.
        recipe_path = Path(settings.retrain.recipe)
        recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
        recipe["model"] = str(new_base)
        recipe_path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
        second = await retrain(settings, Secrets(), sessions, version="v2")
    finally:
        await engine.dispose()

    assert second.decision.current_version == "v1"
    assert second.decision.base_models == {"candidate": str(new_base), "current": str(tiny_model)}
    shown = format_decision(second.decision)
    assert f"current base model: {tiny_model}" in shown
    assert f"candidate base model: {new_base}" in shown


def test_retrain_command_shows_figures(
    tmp_path: Path,
    tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = retrain_settings(tmp_path, tiny_model)
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")), encoding="utf-8")

    code = main(["--config", str(config), "retrain"])

    out = capsys.readouterr().out
    assert code == 0
    assert "compared with base model" in out
    for name in CRITERIA:
        assert name in out
    # The likelihood judge always yields scores, so the counts are real.
    assert "candidate: 3 scores, 0 judge errors" in out
    assert ("promoted" in out) or ("rejected because" in out)


def test_retrain_without_data(tmp_path: Path, tiny_model: Path) -> None:
    settings = retrain_settings(tmp_path, tiny_model, public_data=[])

    with pytest.raises(retrain_module.RetrainError, match=r"retrain\.public_data is empty"):
        retrain_module.collect_sources(settings)


def test_accelerate_launcher_command(tmp_path: Path, tiny_model: Path) -> None:
    settings = retrain_settings(
        tmp_path, tiny_model, launcher="accelerate", accelerate_args=["--num_processes", "2"]
    )

    command = retrain_module.train_command(settings, tmp_path / "data", tmp_path / "run")

    assert command[1:5] == ["-m", "accelerate.commands.launch", "--num_processes", "2"]
    assert command[5:8] == ["-m", "core.cli", "train"]


async def test_retrain_without_held_out_dialogues(tmp_path: Path, tiny_model: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    settings = retrain_settings(tmp_path, tiny_model, eval_file=str(empty))
    await db.upgrade_async(settings.database.url)
    engine = db.create_engine(settings.database)
    try:
        with pytest.raises(retrain_module.RetrainError, match="No held-out dialogues"):
            await retrain(settings, Secrets(), db.create_session_factory(engine), version="v1")
    finally:
        await engine.dispose()

    # It stops before training, so no candidate is recorded.
    assert not (tmp_path / "work" / "v1" / "run").exists()


def test_dataset_build_rejects_missing_exports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "corpus.jsonl"
    write_dialogues(corpus, 4)

    code = main(
        ["dataset", "build", "--out", str(tmp_path / "data"), "--source", str(corpus),
         "--exports", str(tmp_path / "no-exports")]
    )  # fmt: skip

    assert code == 2
    assert "export folder" in capsys.readouterr().err


async def test_promotion_publishes_merged_model(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    serving_dir = tmp_path / "models"
    settings = retrain_settings(tmp_path, tiny_model, serving_dir=str(serving_dir))
    await db.upgrade_async(settings.database.url)
    engine = db.create_engine(settings.database)
    try:
        stub_scores(monkeypatch, {"candidate": SAME, "current": SAME})
        await retrain(settings, Secrets(), db.create_session_factory(engine), version="v1")
        stub_scores(monkeypatch, {"candidate": SAME, "current": SAME})
        await retrain(settings, Secrets(), db.create_session_factory(engine), version="v2")
    finally:
        await engine.dispose()

    link = serving_dir / "serving"
    assert link.is_symlink()
    assert link.resolve() == (serving_dir / "merged-v2").resolve()
    assert (serving_dir / "merged-v1").is_dir()
    assert not (link / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(link)
    assert type(model).__name__ == "LlamaForCausalLM"
