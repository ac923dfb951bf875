"""``mindharbor train`` on the tiny random-weight model: the loss falls, resume continues the
same run, a non-finite loss stops the run, and the saved adapter is checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from core.cli import main
from core.errors import ConfigError
from tests.helpers.tiny_model import build_tiny_chat_model
from training.recipe import load_recipe
from training.train import NonFiniteLoss, TrainingError, train, verify_adapter

EXCHANGES = [
    ("I cannot sleep before my exams.", "That sounds hard. What keeps you awake?"),
    ("My friend stopped talking to me.", "I am sorry. How do you feel about it?"),
    ("我最近压力很大。", "听起来你很辛苦。愿意多说一点吗？"),
    ("Work is too much this week.", "That sounds like a lot. What weighs most?"),
]


def write_dialogues(path: Path, count: int) -> None:
    with path.open("w", encoding="utf-8") as file:
        for index in range(count):
            conversations = []
            for turn in range(2):
                user, assistant = EXCHANGES[(index + turn) % len(EXCHANGES)]
                conversations += [
                    # The day number keeps every dialogue distinct from the others.
                    {"role": "user", "content": f"{user} (day {index})"},
                    {"role": "assistant", "content": assistant},
                ]
            file.write(json.dumps({"conversations": conversations}, ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dataset")
    write_dialogues(folder / "train.jsonl", 24)
    write_dialogues(folder / "validation.jsonl", 8)
    with (folder / "train.jsonl").open("a", encoding="utf-8") as file:
        file.write('{"conversations": [{"role": "robot", "content": "beep"}]}\n')
        file.write("not json\n")
    return folder


def write_recipe(folder: Path, model: Path, data: Path, **overrides: object) -> Path:
    training_args = {
        "output_dir": str(folder / "run"),
        "max_steps": 12,
        "learning_rate": 5e-3,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "logging_steps": 2,
        "save_strategy": "steps",
        "save_steps": 6,
        "eval_strategy": "steps",
        "eval_steps": 6,
        "seed": 7,
    }
    training_args.update(overrides.pop("training_args", {}))  # type: ignore[arg-type]
    recipe = {
        "model": str(model),
        "data_config": {
            "data_dir": str(data),
            "train_file": "train.jsonl",
            "val_file": "validation.jsonl",
        },
        "max_input_length": 64,
        "max_output_length": 32,
        "training_args": training_args,
        "peft_config": {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.1,
            "target_modules": ["q_proj", "v_proj", "down_proj"],
        },
        **overrides,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "lora.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_short_run_lowers_validation_loss(tmp_path: Path, tiny_model: Path, dataset: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, tiny_model, dataset))

    result = train(recipe, progress=False)

    assert result.eval_loss_after < result.eval_loss_before
    assert result.steps == 12
    assert result.dropped == {"unknown role": 1, "invalid JSON": 1}
    assert result.tokens_per_second > 0
    assert result.trained_tokens > 0
    logged = [
        json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    ]
    assert any("loss" in entry and "learning_rate" in entry for entry in logged)
    assert any("eval_loss" in entry for entry in logged)

    adapter = tmp_path / "run" / "adapter"
    metadata = json.loads((adapter / "mindharbor.json").read_text())
    assert metadata["base_model"] == str(tiny_model)
    assert set(metadata["data"]["files"]) == {"train.jsonl", "validation.jsonl"}
    # Two layers, three target modules each.
    assert len(metadata["lora_modules"]) == 6
    assert (adapter / "tokenizer_config.json").is_file()
    summary = json.loads((tmp_path / "run" / "training.json").read_text())
    assert summary["eval_loss_after"] == pytest.approx(result.eval_loss_after)


def test_resume_matches_uninterrupted_run(tmp_path: Path, tiny_model: Path, dataset: Path) -> None:
    whole = load_recipe(write_recipe(tmp_path / "whole", tiny_model, dataset))
    train(whole, progress=False)

    # The second run starts from the first run's checkpoint at step 6, as after a crash there.
    resumed_dir = tmp_path / "resumed"
    resumed = load_recipe(write_recipe(resumed_dir, tiny_model, dataset))
    (resumed_dir / "run").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "whole" / "run" / "checkpoint-6", resumed_dir / "run" / "checkpoint-6"
    )
    result = train(resumed, resume=True, progress=False)

    assert result.steps == 12
    expected = load_file(tmp_path / "whole" / "run" / "adapter" / "adapter_model.safetensors")
    actual = load_file(resumed_dir / "run" / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=1e-5)


def test_non_finite_loss_stops_run(tmp_path: Path, tiny_model: Path, dataset: Path) -> None:
    recipe = load_recipe(
        write_recipe(
            tmp_path,
            tiny_model,
            dataset,
            training_args={"learning_rate": 1e38, "max_grad_norm": 0.0, "eval_strategy": "no"},
        )
    )

    with pytest.raises(NonFiniteLoss, match="learning_rate"):
        train(recipe, progress=False)
    assert not (tmp_path / "run" / "adapter").exists()


def test_unchanged_adapter_rejected(tmp_path: Path, tiny_model: Path, dataset: Path) -> None:
    recipe = load_recipe(
        write_recipe(tmp_path, tiny_model, dataset, training_args={"learning_rate": 0.0})
    )

    with pytest.raises(TrainingError, match="output unchanged"):
        train(recipe, progress=False)


def test_adapter_missing_module_rejected(tmp_path: Path, tiny_model: Path, dataset: Path) -> None:
    train(load_recipe(write_recipe(tmp_path, tiny_model, dataset)), progress=False)
    adapter = tmp_path / "run" / "adapter"
    metadata = json.loads((adapter / "mindharbor.json").read_text())
    weights = load_file(adapter / "adapter_model.safetensors")
    dropped = next(key for key in weights if "layers.1" in key and "down_proj.lora_B" in key)
    del weights[dropped]
    save_file(weights, adapter / "adapter_model.safetensors")

    with pytest.raises(TrainingError, match=r"layers\.1\.mlp\.down_proj\.lora_B"):
        verify_adapter(
            adapter, tiny_model, metadata["lora_modules"], sample={"input_ids": [5, 6, 7, 8]}
        )


def test_chatglm3_demo_recipe_loads(tmp_path: Path) -> None:
    # The demo's field names, including keys this trainer ignores or that transformers renamed.
    demo = {
        "data_config": {
            "train_file": "train.json",
            "val_file": "dev.json",
            "test_file": "dev.json",
            "num_proc": 16,
        },
        "max_input_length": 256,
        "max_output_length": 512,
        "training_args": {
            "output_dir": "./output",
            "max_steps": 3000,
            "learning_rate": 5e-5,
            "per_device_train_batch_size": 4,
            "evaluation_strategy": "steps",
            "gradient_checkpointing": True,
            "predict_with_generate": True,
            "generation_config": {"max_new_tokens": 512},
        },
        "peft_config": {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": 8,
            "lora_alpha": 32,
            "lora_dropout": 0.1,
            "target_modules": "query_key_value",
        },
    }
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(demo), encoding="utf-8")

    recipe = load_recipe(path, data_dir=tmp_path)

    assert recipe.max_length == 768
    assert recipe.train_file == "train.json"
    assert recipe.training_args["eval_strategy"] == "steps"
    assert recipe.training_args["activation_checkpointing"] is True
    assert "predict_with_generate" not in recipe.training_args
    assert recipe.target_modules == ["query_key_value"]
    assert "peft_type" not in recipe.peft_config


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_half_precision_needs_gpu(tmp_path: Path, tiny_model: Path, dataset: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, tiny_model, dataset, precision="bfloat16"))

    with pytest.raises(ConfigError, match="needs a CUDA device"):
        train(recipe, progress=False)


def test_train_command_prints_summary(
    tmp_path: Path, tiny_model: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path, tiny_model, dataset)

    code = main(["train", "--config", str(recipe), "--max-steps", "4", "--no-progress"])

    out = capsys.readouterr().out
    assert code == 0
    assert "Trained 4 steps" in out
    assert "validation loss" in out
    assert str(tmp_path / "run" / "adapter") in out


def test_train_command_missing_dataset(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path, tiny_model, tmp_path / "nowhere")

    code = main(["train", "--config", str(recipe)])

    assert code == 2
    assert "mindharbor dataset build" in capsys.readouterr().err


def test_resume_without_checkpoint_rejected(
    tmp_path: Path, tiny_model: Path, dataset: Path
) -> None:
    recipe = load_recipe(write_recipe(tmp_path, tiny_model, dataset))

    with pytest.raises(TrainingError, match="No checkpoint to resume from"):
        train(recipe, resume=True, progress=False)


def test_resume_of_finished_run_rejected(tmp_path: Path, tiny_model: Path, dataset: Path) -> None:
    recipe = load_recipe(
        write_recipe(tmp_path, tiny_model, dataset, training_args={"max_steps": 6})
    )
    train(recipe, progress=False)

    with pytest.raises(TrainingError, match="already at step 6 of max_steps 6"):
        train(recipe, resume=True, progress=False)
