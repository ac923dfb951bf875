"""``mindharbor train`` under ``accelerate launch``: two data-parallel processes on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from tests.helpers.tiny_model import build_tiny_chat_model
from tests.training.test_train import write_dialogues
from training.train import TokenisedDialogues


def test_train_under_accelerate_launch(tmp_path: Path) -> None:
    model = build_tiny_chat_model(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    write_dialogues(data / "train.jsonl", 40)
    write_dialogues(data / "validation.jsonl", 4)
    recipe = {
        "model": str(model),
        "data_config": {"data_dir": str(data)},
        "max_input_length": 64,
        "max_output_length": 32,
        "training_args": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 4,
            "learning_rate": 5e-3,
            "per_device_train_batch_size": 2,
            "logging_steps": 4,
            "save_strategy": "no",
            "eval_strategy": "no",
        },
        "peft_config": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    }
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    # Without a GPU, accelerate starts CPU processes (gloo) only with ACCELERATE_USE_CPU set.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "core.cli", "train", "--config", str(tmp_path / "lora.yaml"), "--no-progress",
    ]  # fmt: skip

    completed = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, check=False
    )

    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-3000:]
    assert "Process 1 of 2" in output
    assert "Process 2 of 2" in output
    # One summary, from the main process.
    assert output.count("Trained 4 steps") == 1
    assert "tokens in 2 processes" in output
    result = json.loads((tmp_path / "run" / "training.json").read_text())
    assert result["processes"] == 2
    # Each step took two samples per process: twice the epoch share of one process.
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    final = [entry for entry in log if "train_loss" in entry][-1]
    assert final["epoch"] == pytest.approx(4 * 2 * 2 / result["train_samples"], rel=0.02)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    # The token count covers both processes' 4 x 2 samples, not the main process's 8.
    tokenizer = AutoTokenizer.from_pretrained(model)
    lengths = [
        len(sample.input_ids)
        for sample in TokenisedDialogues(data / "train.jsonl", tokenizer, 64 + 32).samples
    ]
    assert 16 * min(lengths) <= result["trained_tokens"] <= 16 * max(lengths)
