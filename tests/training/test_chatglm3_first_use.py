"""A ChatGLM3-layout folder and adapter given straight to MindHarbor: the local generator and
the trainer convert them once under the models folder, and ``mindharbor convert`` does it by
hand. The converted model computes what the original layout computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from core.cli import main
from core.generation.base import ChatMessage, SamplingParams
from core.generation.local import LocalGenerator
from tests.helpers.chatglm3_layout import (
    chatglm3_config,
    merge_lora,
    random_chatglm3_state_dict,
    random_lora_weights,
    reference_forward,
    save_chatglm3_adapter,
    save_chatglm3_checkpoint,
)
from tests.training.test_chatglm3_tokenizer import train_sentencepiece
from tests.training.test_train import write_dialogues

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, repetition_penalty=1.0)
# 400 SentencePiece pieces and ChatGLM3's nine special tokens fit in 416 rows.
CONFIG = chatglm3_config(padded_vocab_size=416, seq_length=512)


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """Return a ChatGLM3-layout model folder, an adapter trained on it, and its weights."""
    root = tmp_path_factory.mktemp("chatglm3")
    state = random_chatglm3_state_dict(CONFIG, seed=5)
    folder = save_chatglm3_checkpoint(root / "chatglm3-tiny", CONFIG, state)
    train_sentencepiece(folder)
    lora = random_lora_weights(CONFIG, seed=6)
    adapter = save_chatglm3_adapter(root / "adapter-v1", lora)
    return folder, adapter, {"state": state, "lora": lora}


async def test_generator_converts_chatglm3_once(
    original: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    folder, adapter, weights = original
    models_dir = tmp_path / "models"

    generator = LocalGenerator(model=folder, adapter=adapter, device="cpu", models_dir=models_dir)
    async with generator:
        reply = await generator.generate([ChatMessage("user", "I cannot sleep.")], GREEDY)
        prompt = generator.tokenizer.apply_chat_template(
            [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
        )
        input_ids = generator.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = generator.model(input_ids=torch.tensor([input_ids])).logits[0]
        model_class = type(generator.model.get_base_model()).__name__

    assert isinstance(reply.text, str)
    assert model_class == "GlmForCausalLM"
    # Base plus adapter, computed in the original layout by the test's own forward pass.
    merged = merge_lora(weights["state"], weights["lora"], scaling=8 / 4)
    expected = reference_forward(CONFIG, merged, torch.tensor(input_ids))
    torch.testing.assert_close(logits.double(), expected.double(), atol=1e-4, rtol=1e-4)
    converted = sorted(path.name for path in models_dir.iterdir() if path.name != "adapters")
    assert len(converted) == 1
    assert len(list((models_dir / "adapters").iterdir())) == 1

    # A second start reuses the conversion.
    stamp = (models_dir / converted[0] / "config.json").stat().st_mtime_ns
    async with LocalGenerator(model=folder, device="cpu", models_dir=models_dir):
        pass
    assert (models_dir / converted[0] / "config.json").stat().st_mtime_ns == stamp


def test_trainer_accepts_chatglm3_folder(
    original: tuple[Path, Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.recipe import load_recipe
    from training.train import train

    folder, _, _ = original
    # Conversions on first use go under var/models of the working folder's project root.
    monkeypatch.setattr("core.config.PROJECT_ROOT", tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    write_dialogues(data / "train.jsonl", 12)
    recipe = {
        "model": str(folder),
        "data_config": {"data_dir": str(data)},
        "max_input_length": 96,
        "max_output_length": 32,
        "training_args": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 3,
            "learning_rate": 1e-2,
            "per_device_train_batch_size": 2,
            "save_strategy": "no",
        },
        # The ChatGLM3 demo's module name, mapped to the native q, k and v projections.
        "peft_config": {"r": 4, "lora_alpha": 8, "target_modules": ["query_key_value"]},
    }
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")

    result = train(load_recipe(tmp_path / "lora.yaml"), progress=False)

    assert result.steps == 3
    adapted = {name.rsplit(".", 1)[-1] for name in _lora_modules(result.adapter_dir)}
    assert adapted == {"q_proj", "k_proj", "v_proj"}


def _lora_modules(adapter_dir: Path) -> list[str]:
    import json

    return json.loads((adapter_dir / "mindharbor.json").read_text())["lora_modules"]


def test_convert_commands_write_folders(
    original: tuple[Path, Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, adapter, _ = original

    assert main(["convert", "chatglm3", str(folder), str(tmp_path / "native")]) == 0
    code = main(
        [
            "convert",
            "chatglm3-adapter",
            str(adapter),
            str(tmp_path / "native-adapter"),
            "--base",
            str(tmp_path / "native"),
        ]
    )

    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "native")
    assert type(model).__name__ == "GlmForCausalLM"
    assert (tmp_path / "native" / "tokenizer.json").is_file()
    assert (tmp_path / "native-adapter" / "adapter_model.safetensors").is_file()
    assert "Converted" in capsys.readouterr().out


def test_convert_command_needs_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = save_chatglm3_checkpoint(
        tmp_path / "no-tokenizer", CONFIG, random_chatglm3_state_dict(CONFIG)
    )

    code = main(["convert", "chatglm3", str(folder), str(tmp_path / "out")])

    assert code == 2
    assert "tokenizer.model" in capsys.readouterr().err


async def test_generator_needs_chatglm3_tokenizer(tmp_path: Path) -> None:
    from core.errors import ConfigError

    folder = save_chatglm3_checkpoint(
        tmp_path / "no-tokenizer", CONFIG, random_chatglm3_state_dict(CONFIG)
    )
    generator = LocalGenerator(model=folder, device="cpu", models_dir=tmp_path / "models")

    with pytest.raises(ConfigError, match=r"tokenizer\.model"):
        await generator.start()
