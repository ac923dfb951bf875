"""A short real LoRA run on the embedded default (SmolLM2-135M-Instruct) with public
counselling dialogues: the validation loss falls."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pytest
import yaml

from core.config import PROJECT_ROOT
from training.recipe import load_recipe
from training.train import train

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
CORPUS = SHARED_DATA / "counselling_en.jsonl"
HELD_OUT = SHARED_DATA / "holdout" / "counselling_en_holdout.jsonl"

pytestmark = pytest.mark.skipif(
    not CORPUS.is_file(), reason="the public counselling dialogues are not beside the repository"
)


def copy_lines(source: Path, target: Path, count: int) -> None:
    with source.open(encoding="utf-8") as lines:
        target.write_text("".join(islice(lines, count)), encoding="utf-8")


@pytest.mark.embedded
def test_short_run_on_embedded_model(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    copy_lines(CORPUS, data / "train.jsonl", 24)
    # Validation dialogues come from the held-out split, so the model never trains on them.
    copy_lines(HELD_OUT, data / "validation.jsonl", 2)
    recipe = {
        "model": "embedded",
        "data_config": {"data_dir": str(data)},
        "max_input_length": 48,
        "max_output_length": 32,
        "training_args": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 8,
            "learning_rate": 2e-3,
            "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 16,
            "logging_steps": 4,
            "save_strategy": "no",
            "eval_strategy": "no",
            "seed": 11,
        },
        "peft_config": {
            "r": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "target_modules": ["q_proj", "v_proj"],
        },
    }
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")

    result = train(load_recipe(tmp_path / "lora.yaml"), progress=False)

    assert result.validation_samples > 0
    assert result.eval_loss_after < result.eval_loss_before
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
