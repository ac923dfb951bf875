"""Conversion of ChatGLM3 checkpoints and LoRA adapters to transformers' GlmForCausalLM.

The converted models must compute the logits of the original layout: the fixed reference
checkpoint's logits come from ChatGLM3's own implementation, and the random checkpoints' logits
from the float64 forward pass in tests/helpers/chatglm3_layout.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GlmForCausalLM, LogitsProcessor, LogitsProcessorList

from core.config import PROJECT_ROOT
from tests.helpers.chatglm3_layout import (
    chatglm3_config,
    merge_lora,
    random_chatglm3_state_dict,
    random_lora_weights,
    reference_forward,
    save_chatglm3_adapter,
    save_chatglm3_checkpoint,
)
from training.chatglm3 import (
    ConversionError,
    convert_adapter,
    convert_checkpoint,
    convert_config,
    is_chatglm3_folder,
)

REFERENCE_DIR = PROJECT_ROOT.parent / "shared" / "data" / "chatglm3-reference"
INPUT_IDS = torch.tensor([[3, 17, 50, 9, 41, 90, 5, 77, 23, 8, 64, 2, 19, 12]])

# Token ids of the small checkpoints' stand-in <|user|> and <|observation|> tokens.
USER_ID = 10
OBSERVATION_ID = 12


def _load_native(folder: Path) -> GlmForCausalLM:
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, GlmForCausalLM)
    return model.eval()


@torch.no_grad()
def _logits(model: torch.nn.Module, input_ids: torch.Tensor = INPUT_IDS) -> torch.Tensor:
    return model(input_ids=input_ids).logits[0]


def _float64(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.double() for name, tensor in tensors.items()}


def _build_checkpoint(folder: Path, **overrides: Any) -> tuple[dict[str, Any], dict]:
    config = chatglm3_config(**overrides)
    state = random_chatglm3_state_dict(config)
    save_chatglm3_checkpoint(folder, config, state)
    return config, state


# fixed reference from ChatGLM3's own implementation


@pytest.fixture
def reference_dir() -> Path:
    if not (REFERENCE_DIR / "checkpoint" / "config.json").is_file():
        pytest.skip(f"ChatGLM3 reference data not found in {REFERENCE_DIR}")
    return REFERENCE_DIR


# The reference logits were computed in float32 and carry its rounding error. At one
# position of the adapter case they differ from a float64 forward of the converted model
# by 6.1e-5, and from a float32 forward by 1.7e-4 on one CPU and by less than 8e-5 on another
# (measured). So the converted model runs in float64, with a tolerance of 1e-4. A
# conversion error would shift logits by whole units.
REFERENCE_ATOL = 1e-4


def test_reference_checkpoint_logits(reference_dir: Path, tmp_path: Path) -> None:
    converted = convert_checkpoint(reference_dir / "checkpoint", tmp_path / "model")
    expected = torch.load(reference_dir / "checkpoint" / "reference_logits.pt", weights_only=True)

    logits = _logits(_load_native(converted).double(), expected["input_ids"])

    torch.testing.assert_close(
        logits.float(), expected["logits"][0], atol=REFERENCE_ATOL, rtol=1e-5
    )


def test_reference_adapter_logits(reference_dir: Path, tmp_path: Path) -> None:
    base = convert_checkpoint(reference_dir / "checkpoint", tmp_path / "model")
    adapter = convert_adapter(reference_dir / "adapter", tmp_path / "adapter", base=base)
    expected = torch.load(reference_dir / "adapter" / "reference_logits.pt", weights_only=True)

    model = PeftModel.from_pretrained(_load_native(base).double(), adapter).eval()
    logits = _logits(model, expected["input_ids"])

    assert logits.dtype == torch.float64
    torch.testing.assert_close(
        logits.float(), expected["logits"][0], atol=REFERENCE_ATOL, rtol=1e-5
    )


def test_reference_forward_matches_chatglm3(reference_dir: Path) -> None:
    # The test's own forward pass, used for the random checkpoints below, reproduces ChatGLM3.
    config = json.loads((reference_dir / "checkpoint" / "config.json").read_text())
    state = torch.load(reference_dir / "checkpoint" / "pytorch_model.bin", weights_only=True)
    expected = torch.load(reference_dir / "checkpoint" / "reference_logits.pt", weights_only=True)

    logits = reference_forward(config, _float64(state), expected["input_ids"][0])

    # The stored float32 logits differ from exact float64 ones by about 8e-6 of rounding.
    torch.testing.assert_close(logits.float(), expected["logits"][0], atol=1e-5, rtol=1e-5)


# random checkpoints against the test's forward pass


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"rope_ratio": 2.0},
        {"multi_query_attention": False, "kv_channels": 8, "add_qkv_bias": False},
    ],
    ids=["default", "rope_ratio", "full_attention_no_bias"],
)
def test_random_checkpoint_logits(tmp_path: Path, overrides: dict[str, Any]) -> None:
    config, state = _build_checkpoint(tmp_path / "chatglm3", **overrides)

    converted = convert_checkpoint(tmp_path / "chatglm3", tmp_path / "model")
    logits = _logits(_load_native(converted))

    expected = reference_forward(config, _float64(state), INPUT_IDS[0])
    torch.testing.assert_close(logits, expected.float(), atol=1e-5, rtol=1e-5)


def test_rope_ratio_changes_logits() -> None:
    # Without this, the rope_ratio case above could pass with the ratio ignored.
    config = chatglm3_config()
    state = _float64(random_chatglm3_state_dict(config))

    plain = reference_forward(config, state, INPUT_IDS[0])
    scaled = reference_forward(chatglm3_config(rope_ratio=2.0), state, INPUT_IDS[0])

    assert (plain - scaled).abs().max() > 1e-3


def test_converted_config_values() -> None:
    glm_config = convert_config(
        chatglm3_config(rope_ratio=50, seq_length=32768), stop_token_ids=[2, USER_ID]
    )

    assert glm_config.vocab_size == 96
    assert glm_config.intermediate_size == 40
    assert glm_config.num_hidden_layers == 2
    assert glm_config.num_key_value_heads == 2
    assert glm_config.head_dim == 16
    assert glm_config.max_position_embeddings == 32768
    assert glm_config.rope_parameters["rope_theta"] == 500000.0
    assert glm_config.rope_parameters["partial_rotary_factor"] == 0.5
    assert glm_config.rms_norm_eps == 1e-5
    assert glm_config.attention_bias is True
    assert glm_config.tie_word_embeddings is False
    assert glm_config.eos_token_id == [2, USER_ID]
    assert glm_config.pad_token_id == 0


# adapters


@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
def test_random_adapter_logits(tmp_path: Path, file_format: str) -> None:
    config, state = _build_checkpoint(tmp_path / "chatglm3", rope_ratio=2.0)
    lora = random_lora_weights(config, rank=4)
    save_chatglm3_adapter(
        tmp_path / "chatglm3-adapter", lora, rank=4, alpha=8, file_format=file_format
    )

    base = convert_checkpoint(tmp_path / "chatglm3", tmp_path / "model")
    adapter = convert_adapter(tmp_path / "chatglm3-adapter", tmp_path / "adapter", base=base)
    model = PeftModel.from_pretrained(_load_native(base), adapter).eval()
    logits = _logits(model)

    merged = merge_lora(_float64(state), _float64(lora), scaling=8 / 4)
    expected = reference_forward(config, merged, INPUT_IDS[0])
    torch.testing.assert_close(logits, expected.float(), atol=1e-5, rtol=1e-5)
    without_adapter = reference_forward(config, _float64(state), INPUT_IDS[0])
    assert (expected - without_adapter).abs().max() > 1e-2


def test_adapter_config_and_keys(tmp_path: Path) -> None:
    config, _ = _build_checkpoint(tmp_path / "chatglm3")
    lora = random_lora_weights(config, targets=("query_key_value",))
    save_chatglm3_adapter(tmp_path / "chatglm3-adapter", lora, targets=("query_key_value",))
    base = convert_checkpoint(tmp_path / "chatglm3", tmp_path / "model")

    adapter = convert_adapter(tmp_path / "chatglm3-adapter", tmp_path / "adapter", base=base)

    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == ["k_proj", "q_proj", "v_proj"]
    assert adapter_config["base_model_name_or_path"] == str(base)
    assert adapter_config["r"] == 4
    assert adapter_config["lora_alpha"] == 8
    weights = load_file(adapter / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.1.self_attn."
    source = "base_model.model.transformer.encoder.layers.1.self_attention.query_key_value."
    for module in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(
            weights[f"{prefix}{module}.lora_A.weight"], lora[source + "lora_A.weight"]
        )
    fused_b = torch.cat(
        [weights[f"{prefix}{module}.lora_B.weight"] for module in ("q_proj", "k_proj", "v_proj")]
    )
    assert torch.equal(fused_b, lora[source + "lora_B.weight"])
    assert weights[f"{prefix}q_proj.lora_B.weight"].shape == (4 * 16, 4)
    assert weights[f"{prefix}k_proj.lora_B.weight"].shape == (2 * 16, 4)
    assert sorted(path.name for path in adapter.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"modules_to_save": ["output_layer"]}, "modules_to_save"),
        ({"rank_pattern": {"query_key_value": 8}}, "rank_pattern"),
        ({"alpha_pattern": {"dense": 32}}, "alpha_pattern"),
        ({"bias": "lora_only"}, "bias"),
        ({"peft_type": "PREFIX_TUNING"}, "PREFIX_TUNING"),
        ({"target_modules": ["query_key_value", "word_embeddings"]}, "word_embeddings"),
        ({"target_modules": ".*query_key_value"}, "regular expression"),
    ],
    ids=[
        "dora",
        "modules_to_save",
        "rank_pattern",
        "alpha_pattern",
        "bias",
        "peft_type",
        "embedding_target",
        "regex_targets",
    ],
)
def test_adapter_unsupported_config(tmp_path: Path, overrides: dict[str, Any], named: str) -> None:
    config, _ = _build_checkpoint(tmp_path / "chatglm3")
    base = convert_checkpoint(tmp_path / "chatglm3", tmp_path / "model")
    save_chatglm3_adapter(tmp_path / "chatglm3-adapter", random_lora_weights(config), **overrides)

    with pytest.raises(ConversionError, match=named):
        convert_adapter(tmp_path / "chatglm3-adapter", tmp_path / "adapter", base=base)
    assert not (tmp_path / "adapter").exists()


def test_adapter_needs_converted_base(tmp_path: Path) -> None:
    config, _ = _build_checkpoint(tmp_path / "chatglm3")
    save_chatglm3_adapter(tmp_path / "chatglm3-adapter", random_lora_weights(config))

    with pytest.raises(ConversionError, match="Convert the ChatGLM3 checkpoint first"):
        convert_adapter(
            tmp_path / "chatglm3-adapter", tmp_path / "adapter", base=tmp_path / "chatglm3"
        )


def test_adapter_for_other_base_rejected(tmp_path: Path) -> None:
    _build_checkpoint(tmp_path / "chatglm3")
    base = convert_checkpoint(tmp_path / "chatglm3", tmp_path / "model")
    wider = chatglm3_config(hidden_size=48)
    save_chatglm3_adapter(tmp_path / "chatglm3-adapter", random_lora_weights(wider))

    with pytest.raises(ConversionError, match="has shape"):
        convert_adapter(tmp_path / "chatglm3-adapter", tmp_path / "adapter", base=base)


def test_adapter_missing_matrix_rejected(tmp_path: Path) -> None:
    config, _ = _build_checkpoint(tmp_path / "chatglm3")
    base = convert_checkpoint(tmp_path / "chatglm3", tmp_path / "model")
    lora = random_lora_weights(config)
    del lora["base_model.model.transformer.encoder.layers.0.mlp.dense_4h_to_h.lora_B.weight"]
    save_chatglm3_adapter(tmp_path / "chatglm3-adapter", lora)

    with pytest.raises(
        ConversionError, match=r"no lora_B matrix for layer module '0\.dense_4h_to_h'"
    ):
        convert_adapter(tmp_path / "chatglm3-adapter", tmp_path / "adapter", base=base)


# generation


class _ForceTokens(LogitsProcessor):
    """Forces the given token ids, one per generation step, in order."""

    def __init__(self, token_ids: list[int], prompt_length: int) -> None:
        self._token_ids = token_ids
        self._prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self._prompt_length
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self._token_ids[step]] = 0.0
        return forced


@pytest.mark.parametrize("stop_id", [USER_ID, OBSERVATION_ID, 2])
def test_generation_stops_on_role_tokens(tmp_path: Path, stop_id: int) -> None:
    _build_checkpoint(tmp_path / "chatglm3")
    converted = convert_checkpoint(
        tmp_path / "chatglm3", tmp_path / "model", stop_token_ids=[2, USER_ID, OBSERVATION_ID]
    )
    model = _load_native(converted)
    prompt = INPUT_IDS[:, :5]
    forced = [30, 31, stop_id, 32, 33, 34, 35, 36]

    output = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=8,
        do_sample=False,
        logits_processor=LogitsProcessorList([_ForceTokens(forced, prompt.shape[1])]),
    )

    assert output[0, 5:].tolist() == [30, 31, stop_id]


def test_generation_config_written(tmp_path: Path) -> None:
    _build_checkpoint(tmp_path / "chatglm3")
    generation = {"do_sample": True, "top_p": 0.8, "temperature": 0.8, "use_cache": False}
    (tmp_path / "chatglm3" / "generation_config.json").write_text(json.dumps(generation))

    converted = convert_checkpoint(
        tmp_path / "chatglm3", tmp_path / "model", stop_token_ids=[2, USER_ID, OBSERVATION_ID]
    )

    written = json.loads((converted / "generation_config.json").read_text())
    assert written["eos_token_id"] == [2, USER_ID, OBSERVATION_ID]
    assert written["pad_token_id"] == 0
    assert written["top_p"] == 0.8
    assert written["do_sample"] is True
    assert "use_cache" not in written
    config = json.loads((converted / "config.json").read_text())
    assert config["eos_token_id"] == [2, USER_ID, OBSERVATION_ID]


def test_stop_ids_from_tokenizer_model(tmp_path: Path) -> None:
    sentencepiece = pytest.importorskip("sentencepiece")
    _build_checkpoint(tmp_path / "chatglm3")
    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(
            ["I have been feeling anxious about my exams.", "我最近压力很大，晚上睡不着觉。"] * 5
        ),
        model_writer=model_file,
        vocab_size=50,
        model_type="bpe",
        minloglevel=2,
    )
    (tmp_path / "chatglm3" / "tokenizer.model").write_bytes(model_file.getvalue())

    converted = convert_checkpoint(tmp_path / "chatglm3", tmp_path / "model")

    written = json.loads((converted / "generation_config.json").read_text())
    # <|user|> and <|observation|> follow the 50 pieces at offsets 6 and 8.
    assert written["eos_token_id"] == [2, 56, 58]


def test_stop_ids_default_to_eos(tmp_path: Path) -> None:
    _build_checkpoint(tmp_path / "chatglm3")

    converted = convert_checkpoint(tmp_path / "chatglm3", tmp_path / "model")

    written = json.loads((converted / "generation_config.json").read_text())
    assert written["eos_token_id"] == [2]


def test_stop_id_outside_vocabulary_rejected(tmp_path: Path) -> None:
    _build_checkpoint(tmp_path / "chatglm3")

    with pytest.raises(ConversionError, match="64795 is outside the vocabulary of 96"):
        convert_checkpoint(tmp_path / "chatglm3", tmp_path / "model", stop_token_ids=[2, 64795])


# source and output files


@pytest.mark.parametrize(
    ("shards", "file_format"),
    [(2, "bin"), (2, "safetensors"), (1, "safetensors")],
    ids=["bin_shards", "safetensors_shards", "safetensors_single"],
)
def test_source_formats_convert_alike(tmp_path: Path, shards: int, file_format: str) -> None:
    config, state = _build_checkpoint(tmp_path / "single-bin", rope_ratio=2.0)
    save_chatglm3_checkpoint(
        tmp_path / "other", config, state, shards=shards, file_format=file_format
    )
    expected = _logits(_load_native(convert_checkpoint(tmp_path / "single-bin", tmp_path / "a")))

    logits = _logits(_load_native(convert_checkpoint(tmp_path / "other", tmp_path / "b")))

    assert torch.equal(logits, expected)


def test_output_split_into_shards(tmp_path: Path) -> None:
    config, state = _build_checkpoint(tmp_path / "chatglm3")
    save_chatglm3_checkpoint(tmp_path / "sharded", config, state, shards=3)

    converted = convert_checkpoint(tmp_path / "sharded", tmp_path / "model", max_shard_bytes=20_000)

    index = json.loads((converted / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (converted / "model.safetensors").exists()
    logits = _logits(_load_native(converted))
    expected = reference_forward(config, _float64(state), INPUT_IDS[0])
    torch.testing.assert_close(logits, expected.float(), atol=1e-5, rtol=1e-5)


def test_tokenizer_callable_writes_into_output(tmp_path: Path) -> None:
    _build_checkpoint(tmp_path / "chatglm3")
    calls: list[tuple[Path, Path]] = []

    def write_tokenizer(src: Path, dst: Path) -> None:
        calls.append((src, dst))
        (dst / "tokenizer_config.json").write_text("{}")

    converted = convert_checkpoint(
        tmp_path / "chatglm3", tmp_path / "model", tokenizer=write_tokenizer
    )

    assert len(calls) == 1
    assert calls[0][0] == tmp_path / "chatglm3"
    assert (converted / "tokenizer_config.json").is_file()


def test_license_files_copied(tmp_path: Path) -> None:
    _build_checkpoint(tmp_path / "chatglm3")
    (tmp_path / "chatglm3" / "MODEL_LICENSE").write_text("model license terms")
    (tmp_path / "chatglm3" / "README.md").write_text("remote code usage")

    converted = convert_checkpoint(tmp_path / "chatglm3", tmp_path / "model")

    assert (converted / "MODEL_LICENSE").read_text() == "model license terms"
    assert not (converted / "README.md").exists()


def test_is_chatglm3_folder(tmp_path: Path) -> None:
    _build_checkpoint(tmp_path / "chatglm3")
    converted = convert_checkpoint(tmp_path / "chatglm3", tmp_path / "model")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")

    assert is_chatglm3_folder(tmp_path / "chatglm3")
    assert not is_chatglm3_folder(converted)
    assert not is_chatglm3_folder(tmp_path / "broken")
    assert not is_chatglm3_folder(tmp_path / "absent")


UNSUPPORTED_CONFIGS = [
    ({"rmsnorm": False}, "'rmsnorm'"),
    ({"add_bias_linear": True}, "'add_bias_linear'"),
    ({"apply_residual_connection_post_layernorm": True}, "'apply_residual_connection"),
    ({"post_layer_norm": False}, "'post_layer_norm'"),
    ({"original_rope": False}, "'original_rope'"),
    ({"quantization_bit": 4}, "'quantization_bit'"),
    ({"pre_seq_len": 128}, "'pre_seq_len'"),
    ({"kv_channels": 6}, "'kv_channels'"),
    ({"multi_query_group_num": 3}, "'multi_query_group_num'"),
    ({"model_type": "llama"}, "'model_type'"),
    ({"eos_token_id": None}, "'eos_token_id'"),
    ({"num_layers": None}, "'num_layers'"),
]


@pytest.mark.parametrize(
    ("overrides", "named"),
    UNSUPPORTED_CONFIGS,
    ids=[next(iter(overrides)) for overrides, _ in UNSUPPORTED_CONFIGS],
)
def test_unsupported_config_rejected(tmp_path: Path, overrides: dict[str, Any], named: str) -> None:
    config, _ = _build_checkpoint(tmp_path / "chatglm3")
    config.update(overrides)
    (tmp_path / "chatglm3" / "config.json").write_text(json.dumps(config))

    with pytest.raises(ConversionError, match=named):
        convert_checkpoint(tmp_path / "chatglm3", tmp_path / "model")
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("shards", [1, 2])
def test_missing_weight_rejected(tmp_path: Path, shards: int) -> None:
    config = chatglm3_config()
    state = random_chatglm3_state_dict(config)
    del state["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    save_chatglm3_checkpoint(tmp_path / "chatglm3", config, state, shards=shards)

    with pytest.raises(
        ConversionError, match=r"transformer\.encoder\.layers\.1\.mlp\.dense_4h_to_h"
    ):
        convert_checkpoint(tmp_path / "chatglm3", tmp_path / "model")
    assert not (tmp_path / "model").exists()
    assert list(tmp_path.glob(".model.*")) == []


def test_unknown_weight_rejected(tmp_path: Path) -> None:
    config = chatglm3_config()
    state = random_chatglm3_state_dict(config)
    state["transformer.prefix_encoder.embedding.weight"] = torch.zeros(4, 8)
    save_chatglm3_checkpoint(tmp_path / "chatglm3", config, state)

    with pytest.raises(ConversionError, match=r"transformer\.prefix_encoder\.embedding\.weight"):
        convert_checkpoint(tmp_path / "chatglm3", tmp_path / "model")


def test_misshapen_weight_rejected(tmp_path: Path) -> None:
    config = chatglm3_config()
    state = random_chatglm3_state_dict(config)
    # A checkpoint whose config claims 2 key/value groups but whose weights have 4.
    state["transformer.encoder.layers.0.self_attention.query_key_value.weight"] = torch.zeros(
        4 * 16 * 3, 32
    )
    save_chatglm3_checkpoint(tmp_path / "chatglm3", config, state)

    with pytest.raises(
        ConversionError, match=r"has shape \(192, 32\); the config implies \(128, 32\)"
    ):
        convert_checkpoint(tmp_path / "chatglm3", tmp_path / "model")


def test_missing_weights_file_rejected(tmp_path: Path) -> None:
    _build_checkpoint(tmp_path / "chatglm3")
    (tmp_path / "chatglm3" / "pytorch_model.bin").unlink()

    with pytest.raises(ConversionError, match="No weights found"):
        convert_checkpoint(tmp_path / "chatglm3", tmp_path / "model")


def test_non_empty_output_rejected(tmp_path: Path) -> None:
    _build_checkpoint(tmp_path / "chatglm3")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("existing")

    with pytest.raises(ConversionError, match="not empty"):
        convert_checkpoint(tmp_path / "chatglm3", tmp_path / "model")
    assert (tmp_path / "model" / "keep.txt").read_text() == "existing"


def test_empty_output_folder_accepted(tmp_path: Path) -> None:
    _build_checkpoint(tmp_path / "chatglm3")
    (tmp_path / "model").mkdir()

    converted = convert_checkpoint(tmp_path / "chatglm3", tmp_path / "model")

    assert (converted / "model.safetensors").is_file()
