"""Small random-weight checkpoints and LoRA adapters in ChatGLM3's original layout, and a plain
torch forward pass over that layout, for testing the conversion to transformers' GlmForCausalLM.

The forward pass follows the layout description and shares no code with the converter. It
computes the embedding and then, per layer, RMSNorm, the fused query/key/value projection with
bias, and rotary position embedding on the first half of each head's dimensions, with adjacent
pairs rotated together and base 10000 times rope_ratio. Causal grouped-query attention scaled by
1/sqrt(head_dim) and the output projection follow, then RMSNorm and a SwiGLU feed-forward whose
fused weight has the gate rows first. The final RMSNorm and the output layer end it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")

# The module path of each LoRA target inside a ChatGLM3 layer.
_TARGET_PATHS = {
    "query_key_value": "self_attention.query_key_value",
    "dense": "self_attention.dense",
    "dense_h_to_4h": "mlp.dense_h_to_4h",
    "dense_4h_to_h": "mlp.dense_4h_to_h",
}

# The peft key prefix of a ChatGLM3ForConditionalGeneration wrapped in a PeftModel.
ADAPTER_PREFIX = "base_model.model.transformer.encoder.layers"


def chatglm3_config(**overrides: Any) -> dict[str, Any]:
    """Return a config.json dict in ChatGLM3's format for a 2-layer model with small widths.

    The defaults are 4 query heads of 16 dimensions and 2 key/value groups. ``overrides`` replace
    or add keys, for example ``rope_ratio=2.0``.
    """
    config: dict[str, Any] = {
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "eos_token_id": 2,
        "ffn_hidden_size": 40,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": 32,
        "kv_channels": 16,
        "layernorm_epsilon": 1e-5,
        "multi_query_attention": True,
        "multi_query_group_num": 2,
        "num_attention_heads": 4,
        "num_layers": 2,
        "original_rope": True,
        "pad_token_id": 0,
        "padded_vocab_size": 96,
        "post_layer_norm": True,
        "pre_seq_len": None,
        "prefix_projection": False,
        "quantization_bit": 0,
        "rmsnorm": True,
        "seq_length": 64,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    config.update(overrides)
    return config


def _query_key_value_rows(config: dict[str, Any]) -> tuple[int, int]:
    head_dim = config["kv_channels"]
    groups = (
        config["multi_query_group_num"]
        if config["multi_query_attention"]
        else config["num_attention_heads"]
    )
    return config["num_attention_heads"] * head_dim, groups * head_dim


def random_chatglm3_state_dict(config: dict[str, Any], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return random float32 weights with ChatGLM3's parameter names and shapes for ``config``.

    Norm weights are drawn around 1 and biases around 0, so that every weight changes the logits.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, mean: float = 0.0, std: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std + mean

    hidden = config["hidden_size"]
    ffn = config["ffn_hidden_size"]
    vocab = config["padded_vocab_size"]
    query_rows, key_value_rows = _query_key_value_rows(config)
    qkv_rows = query_rows + 2 * key_value_rows
    rotary_dim = config["kv_channels"] // 2

    state: dict[str, torch.Tensor] = {
        "transformer.embedding.word_embeddings.weight": normal(vocab, hidden, std=1.0),
        # ChatGLM3 saves this buffer but computes its rotary angles without it.
        "transformer.rotary_pos_emb.inv_freq": 1.0
        / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)),
    }
    for index in range(config["num_layers"]):
        prefix = f"transformer.encoder.layers.{index}."
        state[prefix + "input_layernorm.weight"] = normal(hidden, mean=1.0, std=0.1)
        state[prefix + "self_attention.query_key_value.weight"] = normal(qkv_rows, hidden)
        if config["add_qkv_bias"]:
            state[prefix + "self_attention.query_key_value.bias"] = normal(qkv_rows, std=0.5)
        state[prefix + "self_attention.dense.weight"] = normal(hidden, query_rows)
        state[prefix + "post_attention_layernorm.weight"] = normal(hidden, mean=1.0, std=0.1)
        state[prefix + "mlp.dense_h_to_4h.weight"] = normal(2 * ffn, hidden)
        state[prefix + "mlp.dense_4h_to_h.weight"] = normal(hidden, ffn)
    state["transformer.encoder.final_layernorm.weight"] = normal(hidden, mean=1.0, std=0.1)
    state["transformer.output_layer.weight"] = normal(vocab, hidden)
    return state


def save_chatglm3_checkpoint(
    folder: Path,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    *,
    shards: int = 1,
    file_format: str = "bin",
) -> Path:
    """Write ``config`` and ``state`` to ``folder`` as the ChatGLM3 model repository does.

    ``file_format`` "bin" writes pytorch_model.bin, "safetensors" writes model.safetensors. With
    ``shards`` > 1 the tensors are split into that many files in name order, with an index file
    in the Hugging Face format (``weight_map`` and ``metadata.total_size``).
    """
    if file_format not in ("bin", "safetensors"):
        raise ValueError(f"Unknown file_format {file_format!r}: use 'bin' or 'safetensors'.")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    stem, suffix = ("pytorch_model", ".bin") if file_format == "bin" else ("model", ".safetensors")
    names = list(state)
    per_shard = math.ceil(len(names) / shards)
    groups = [names[start : start + per_shard] for start in range(0, len(names), per_shard)]

    weight_map: dict[str, str] = {}
    for number, group in enumerate(groups, start=1):
        file_name = (
            f"{stem}{suffix}"
            if shards == 1
            else f"{stem}-{number:05d}-of-{len(groups):05d}{suffix}"
        )
        tensors = {name: state[name].contiguous() for name in group}
        if file_format == "bin":
            torch.save(tensors, folder / file_name)
        else:
            save_file(tensors, folder / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file_name))

    if shards > 1:
        total_size = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (folder / f"{stem}{suffix}.index.json").write_text(json.dumps(index), encoding="utf-8")
    return folder


def random_lora_weights(
    config: dict[str, Any],
    *,
    rank: int = 4,
    targets: tuple[str, ...] = LORA_TARGETS,
    seed: int = 1,
) -> dict[str, torch.Tensor]:
    """Return random LoRA A and B matrices under peft's saved key names for a ChatGLM3 model.

    B is random too (peft initializes it to zero), so that every adapter weight changes the
    logits.
    """
    generator = torch.Generator().manual_seed(seed)
    hidden = config["hidden_size"]
    ffn = config["ffn_hidden_size"]
    query_rows, key_value_rows = _query_key_value_rows(config)
    # (in_features, out_features) of each target Linear.
    features = {
        "query_key_value": (hidden, query_rows + 2 * key_value_rows),
        "dense": (query_rows, hidden),
        "dense_h_to_4h": (hidden, 2 * ffn),
        "dense_4h_to_h": (ffn, hidden),
    }

    weights: dict[str, torch.Tensor] = {}
    for index in range(config["num_layers"]):
        for target in targets:
            in_features, out_features = features[target]
            key = f"{ADAPTER_PREFIX}.{index}.{_TARGET_PATHS[target]}"
            weights[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator)
            weights[f"{key}.lora_B.weight"] = (
                torch.randn(out_features, rank, generator=generator) * 0.1
            )
    return weights


def save_chatglm3_adapter(
    folder: Path,
    weights: dict[str, torch.Tensor],
    *,
    rank: int = 4,
    alpha: int = 8,
    targets: tuple[str, ...] = LORA_TARGETS,
    file_format: str = "safetensors",
    **config_overrides: Any,
) -> Path:
    """Write ``weights`` and an adapter_config.json as peft's save_pretrained does for LoRA."""
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "alpha_pattern": {},
        "base_model_name_or_path": "chatglm3-6b",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(targets),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    config.update(config_overrides)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if file_format == "bin":
        torch.save(weights, folder / "adapter_model.bin")
    else:
        save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


def merge_lora(
    state: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], scaling: float
) -> dict[str, torch.Tensor]:
    """Return a copy of ``state`` with W + scaling * B @ A added to every LoRA target weight."""
    merged = dict(state)
    for key, lora_a in lora.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        lora_b = lora[f"{module}.lora_B.weight"]
        weight_name = module.removeprefix("base_model.model.") + ".weight"
        merged[weight_name] = state[weight_name] + scaling * (lora_b @ lora_a)
    return merged


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_adjacent_pairs(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate (x[2i], x[2i+1]) by position * base^(-2i / rotary_dim) on the first half of the
    last dimension and pass the second half through. ``x`` is [heads, seq, head_dim]."""
    head_dim = x.shape[-1]
    rotary_dim = head_dim // 2
    pair_count = rotary_dim // 2
    frequencies = base ** (-torch.arange(pair_count, dtype=torch.float64) * 2 / rotary_dim)
    angles = positions.to(torch.float64)[:, None] * frequencies[None, :]
    cos = angles.cos().to(x.dtype)
    sin = angles.sin().to(x.dtype)

    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    pairs = rotated.reshape(*rotated.shape[:-1], pair_count, 2)
    first, second = pairs[..., 0], pairs[..., 1]
    out_first = first * cos - second * sin
    out_second = second * cos + first * sin
    rotated = torch.stack((out_first, out_second), dim=-1).flatten(-2)
    return torch.cat((rotated, passed), dim=-1)


@torch.no_grad()
def reference_forward(
    config: dict[str, Any], state: dict[str, torch.Tensor], input_ids: torch.Tensor
) -> torch.Tensor:
    """Return the logits [seq, vocab] of the ChatGLM3-layout model for one sequence of ids.

    To apply a LoRA adapter, pass the weights from ``merge_lora``.
    """
    head_dim = config["kv_channels"]
    heads = config["num_attention_heads"]
    groups = config["multi_query_group_num"] if config["multi_query_attention"] else heads
    query_rows, key_value_rows = _query_key_value_rows(config)
    eps = config["layernorm_epsilon"]
    base = 10000.0 * config.get("rope_ratio", 1)
    seq = input_ids.shape[0]
    positions = torch.arange(seq)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()

    hidden = state["transformer.embedding.word_embeddings.weight"][input_ids]
    for index in range(config["num_layers"]):
        prefix = f"transformer.encoder.layers.{index}."

        normed = _rms_norm(hidden, state[prefix + "input_layernorm.weight"], eps)
        qkv = normed @ state[prefix + "self_attention.query_key_value.weight"].T
        if config["add_qkv_bias"]:
            qkv = qkv + state[prefix + "self_attention.query_key_value.bias"]
        query = qkv[:, :query_rows].reshape(seq, heads, head_dim).transpose(0, 1)
        key = qkv[:, query_rows : query_rows + key_value_rows]
        key = key.reshape(seq, groups, head_dim).transpose(0, 1)
        value = qkv[:, query_rows + key_value_rows :].reshape(seq, groups, head_dim).transpose(0, 1)

        query = _rotate_adjacent_pairs(query, positions, base)
        key = _rotate_adjacent_pairs(key, positions, base)
        # Each key/value group serves heads // groups consecutive query heads.
        key = key.repeat_interleave(heads // groups, dim=0)
        value = value.repeat_interleave(heads // groups, dim=0)

        scores = query @ key.transpose(1, 2) / math.sqrt(head_dim)
        scores = scores.masked_fill(~causal, float("-inf"))
        context = scores.softmax(dim=-1) @ value
        context = context.transpose(0, 1).reshape(seq, heads * head_dim)
        hidden = hidden + context @ state[prefix + "self_attention.dense.weight"].T

        normed = _rms_norm(hidden, state[prefix + "post_attention_layernorm.weight"], eps)
        gate_up = normed @ state[prefix + "mlp.dense_h_to_4h.weight"].T
        gate, up = gate_up.chunk(2, dim=-1)
        activated = torch.nn.functional.silu(gate) * up
        hidden = hidden + activated @ state[prefix + "mlp.dense_4h_to_h.weight"].T

    hidden = _rms_norm(hidden, state["transformer.encoder.final_layernorm.weight"], eps)
    return hidden @ state["transformer.output_layer.weight"].T
