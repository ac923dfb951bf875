"""Convert ChatGLM3 checkpoints and their LoRA adapters to transformers' native GLM layout.

ChatGLM3 checkpoints (model_type "chatglm") need the model repository's own Python code. Their
architecture is the one that transformers ships as ``GlmForCausalLM``, so the conversion only
renames tensors, splits the fused query/key/value projection into q_proj, k_proj and v_proj, and
writes a ``GlmConfig``. The converted folder loads with ``AutoModelForCausalLM`` and no
``trust_remote_code``.

Tensor mapping, per layer N (prefix ``transformer.encoder.layers.N.`` to ``model.layers.N.``):

- ``self_attention.query_key_value`` (weight and bias) splits by rows into ``self_attn.q_proj``
  (num_attention_heads * kv_channels rows), ``self_attn.k_proj`` and ``self_attn.v_proj``
  (key/value groups * kv_channels rows each).
- ``self_attention.dense`` becomes ``self_attn.o_proj``, ``mlp.dense_h_to_4h`` becomes
  ``mlp.gate_up_proj`` and ``mlp.dense_4h_to_h`` becomes ``mlp.down_proj``. Both layouts keep the
  gate rows before the up rows and compute silu(gate) * up.
- The two layer norms keep their names. ``transformer.embedding.word_embeddings``,
  ``transformer.encoder.final_layernorm`` and ``transformer.output_layer`` become
  ``model.embed_tokens``, ``model.norm`` and ``lm_head``. ChatGLM3 computes its rotary angles
  without its saved ``transformer.rotary_pos_emb.inv_freq`` buffer, so that buffer is dropped.

No row permutation is needed for the rotary position embedding. ChatGLM3 rotates adjacent pairs
(2i, 2i+1) of the first half of each head's dimensions by position * base^(-2i / rotary_dim).
``apply_rotary_pos_emb`` of GLM in transformers 5.25 does the same: its ``rotate_half`` pairs
x[0::2] with x[1::2], it repeats each frequency twice with ``repeat_interleave``, and
``partial_rotary_factor`` 0.5 limits the rotation to the first half of each head.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import pickle
import re
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, GlmConfig

logger = logging.getLogger(__name__)

CHATGLM_MODEL_TYPE = "chatglm"
GLM_MODEL_TYPE = "glm"

# The largest output safetensors file, in bytes. Conversion keeps one output file's tensors in
# memory, and safetensors' save_file copies them to bytes while writing. Peak memory is therefore
# about one source file plus twice this size, an estimate from conversions of a 0.9 GiB float16
# checkpoint. For ChatGLM3-6B (11.6 GiB of float16 weights) that is about 2 GiB plus its largest
# source file.
DEFAULT_MAX_SHARD_BYTES = 1024**3

# ChatGLM3 rotates the first half of each head's dimensions and passes the rest through.
PARTIAL_ROTARY_FACTOR = 0.5
ROPE_BASE = 10000.0

# Source weight files, in the order they are looked for. The ChatGLM3-6B repository ships both
# formats, and safetensors is preferred because it loads tensor by tensor without unpickling.
_SOURCE_WEIGHT_FILES = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)

# ChatGLM3's tokenizer places these tokens right after its SentencePiece pieces, at these
# offsets from the piece count: [MASK], [gMASK], [sMASK], sop, eop, <|system|>, <|user|>,
# <|assistant|>, <|observation|>.
_USER_TOKEN_OFFSET = 6
_OBSERVATION_TOKEN_OFFSET = 8

# Sampling settings copied from the source generation_config.json, when it sets them.
_GENERATION_KEYS = (
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "max_length",
    "max_new_tokens",
)

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_SAFETENSORS_FILE = "adapter_model.safetensors"
ADAPTER_BIN_FILE = "adapter_model.bin"

# Each ChatGLM3 LoRA target module and the native GLM modules that replace it.
_ADAPTER_TARGETS = {
    "query_key_value": ("q_proj", "k_proj", "v_proj"),
    "dense": ("o_proj",),
    "dense_h_to_4h": ("gate_up_proj",),
    "dense_4h_to_h": ("down_proj",),
}
_ADAPTER_MODULE_PATHS = {
    "self_attention.query_key_value": "query_key_value",
    "self_attention.dense": "dense",
    "mlp.dense_h_to_4h": "dense_h_to_4h",
    "mlp.dense_4h_to_h": "dense_4h_to_h",
}
_NATIVE_MODULE_PATHS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_up_proj": "mlp.gate_up_proj",
    "down_proj": "mlp.down_proj",
}
_ADAPTER_KEY = re.compile(
    r"base_model\.model\.transformer\.encoder\.layers\.(?P<layer>\d+)\."
    r"(?P<module>self_attention\.query_key_value|self_attention\.dense|mlp\.dense_h_to_4h|"
    r"mlp\.dense_4h_to_h)\.(?P<matrix>lora_A|lora_B)\.weight"
)
_LAYER_KEY = re.compile(r"transformer\.encoder\.layers\.(?P<layer>\d+)\.(?P<rest>.+)")


class ConversionError(ValueError):
    """The ChatGLM3 checkpoint, adapter or output folder cannot be converted.

    The message names the file, key or value at fault.
    """


@dataclass(frozen=True)
class _Layout:
    """Sizes of a ChatGLM3 model, read from its config.json."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    qkv_bias: bool

    @property
    def query_rows(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def key_value_rows(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def source_shapes(self) -> dict[str, tuple[int, ...]]:
        """Return the shape of every weight that a ChatGLM3 checkpoint of this size contains."""
        qkv_rows = self.query_rows + 2 * self.key_value_rows
        shapes: dict[str, tuple[int, ...]] = {
            "transformer.embedding.word_embeddings.weight": (self.vocab_size, self.hidden_size),
            "transformer.encoder.final_layernorm.weight": (self.hidden_size,),
            "transformer.output_layer.weight": (self.vocab_size, self.hidden_size),
        }
        for index in range(self.num_layers):
            prefix = f"transformer.encoder.layers.{index}."
            shapes[prefix + "input_layernorm.weight"] = (self.hidden_size,)
            shapes[prefix + "self_attention.query_key_value.weight"] = (qkv_rows, self.hidden_size)
            if self.qkv_bias:
                shapes[prefix + "self_attention.query_key_value.bias"] = (qkv_rows,)
            shapes[prefix + "self_attention.dense.weight"] = (self.hidden_size, self.query_rows)
            shapes[prefix + "post_attention_layernorm.weight"] = (self.hidden_size,)
            shapes[prefix + "mlp.dense_h_to_4h.weight"] = (
                2 * self.ffn_hidden_size,
                self.hidden_size,
            )
            shapes[prefix + "mlp.dense_4h_to_h.weight"] = (self.hidden_size, self.ffn_hidden_size)
        return shapes


# Weights that a ChatGLM3 checkpoint may contain and the conversion drops.
_DROPPED_WEIGHTS = frozenset({"transformer.rotary_pos_emb.inv_freq"})


def is_chatglm3_folder(path: Path) -> bool:
    """Return whether ``path`` is a folder whose config.json has model_type "chatglm"."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("model_type") == CHATGLM_MODEL_TYPE


# configuration


def convert_config(
    chatglm_config: dict[str, Any], *, stop_token_ids: list[int] | None = None
) -> GlmConfig:
    """Return the ``GlmConfig`` of the native model equivalent to a ChatGLM3 config.json.

    ``stop_token_ids`` become the config's ``eos_token_id`` list. When it is None, the list
    contains only the ChatGLM3 config's ``eos_token_id``. Raises ConversionError, naming the
    key, when the config is not a ChatGLM3 config or selects a variant that GlmForCausalLM cannot
    compute (a LayerNorm model, biases on the dense layers, quantized weights, a p-tuning prefix).
    """
    layout = _layout_from_config(chatglm_config)
    eos_token_id = chatglm_config.get("eos_token_id")
    if not isinstance(eos_token_id, int) or isinstance(eos_token_id, bool):
        raise ConversionError(
            f"ChatGLM3 config key 'eos_token_id' is {eos_token_id!r}; expected an integer "
            "token id (2 in ChatGLM3-6B)."
        )
    pad_token_id = chatglm_config.get("pad_token_id")
    if pad_token_id is not None and not 0 <= pad_token_id < layout.vocab_size:
        raise ConversionError(
            f"ChatGLM3 config key 'pad_token_id' is {pad_token_id!r}, which is outside the "
            f"vocabulary of {layout.vocab_size} ids."
        )
    stop_ids = _validate_stop_token_ids(
        stop_token_ids if stop_token_ids is not None else [eos_token_id], layout.vocab_size
    )
    rope_ratio = _number(chatglm_config, "rope_ratio", default=1)
    torch_dtype = chatglm_config.get("torch_dtype")

    return GlmConfig(
        vocab_size=layout.vocab_size,
        hidden_size=layout.hidden_size,
        intermediate_size=layout.ffn_hidden_size,
        num_hidden_layers=layout.num_layers,
        num_attention_heads=layout.num_heads,
        num_key_value_heads=layout.num_key_value_heads,
        head_dim=layout.head_dim,
        hidden_act="silu",
        attention_dropout=0.0,
        max_position_embeddings=_positive_int(chatglm_config, "seq_length"),
        rms_norm_eps=_number(chatglm_config, "layernorm_epsilon", default=1e-5),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": ROPE_BASE * rope_ratio,
            "partial_rotary_factor": PARTIAL_ROTARY_FACTOR,
        },
        attention_bias=layout.qkv_bias,
        tie_word_embeddings=False,
        use_cache=True,
        eos_token_id=stop_ids,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        dtype=torch_dtype if torch_dtype in ("float32", "float16", "bfloat16") else None,
        architectures=["GlmForCausalLM"],
    )


def _layout_from_config(config: dict[str, Any]) -> _Layout:
    if config.get("model_type") != CHATGLM_MODEL_TYPE:
        raise ConversionError(
            f"Config key 'model_type' is {config.get('model_type')!r}; expected "
            f"{CHATGLM_MODEL_TYPE!r} (a ChatGLM3 checkpoint)."
        )
    _reject_unsupported_options(config)

    num_heads = _positive_int(config, "num_attention_heads")
    multi_query = config.get("multi_query_attention")
    if not isinstance(multi_query, bool):
        raise ConversionError(
            f"ChatGLM3 config key 'multi_query_attention' is {multi_query!r}; expected true "
            "or false."
        )
    num_key_value_heads = (
        _positive_int(config, "multi_query_group_num") if multi_query else num_heads
    )
    if num_heads % num_key_value_heads:
        raise ConversionError(
            f"ChatGLM3 config key 'multi_query_group_num' is {num_key_value_heads}, which does "
            f"not divide num_attention_heads {num_heads}."
        )
    head_dim = _positive_int(config, "kv_channels")
    if head_dim % 4:
        # The rotary half of each head must consist of whole (2i, 2i+1) pairs.
        raise ConversionError(
            f"ChatGLM3 config key 'kv_channels' is {head_dim}; the conversion needs a multiple "
            "of 4, so that the rotary half of each head consists of whole dimension pairs."
        )
    qkv_bias = config.get("add_qkv_bias")
    if not isinstance(qkv_bias, bool):
        raise ConversionError(
            f"ChatGLM3 config key 'add_qkv_bias' is {qkv_bias!r}; expected true or false."
        )

    return _Layout(
        num_layers=_positive_int(config, "num_layers"),
        hidden_size=_positive_int(config, "hidden_size"),
        ffn_hidden_size=_positive_int(config, "ffn_hidden_size"),
        num_heads=num_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        vocab_size=_positive_int(config, "padded_vocab_size"),
        qkv_bias=qkv_bias,
    )


def _reject_unsupported_options(config: dict[str, Any]) -> None:
    # Options absent from config.json are treated as the supported value here. A checkpoint
    # whose weights then do not fit the layout fails the weight name and shape checks instead.
    unsupported = [
        ("rmsnorm", False, "LayerNorm instead of RMSNorm"),
        ("add_bias_linear", True, "biases on the dense and feed-forward layers"),
        ("apply_residual_connection_post_layernorm", True, "residuals taken after the norm"),
        ("post_layer_norm", False, "no final layer norm"),
        ("original_rope", False, "a rotary embedding other than ChatGLM3's original one"),
    ]
    for key, value, meaning in unsupported:
        if config.get(key) is value:
            raise ConversionError(
                f"ChatGLM3 config key {key!r} is {json.dumps(value)} ({meaning}), which "
                "GlmForCausalLM cannot compute; only ChatGLM3-6B's architecture is supported."
            )
    if config.get("quantization_bit"):
        raise ConversionError(
            f"ChatGLM3 config key 'quantization_bit' is {config['quantization_bit']!r}: the "
            "weights are quantized. Convert the float16 or bfloat16 checkpoint instead."
        )
    if config.get("pre_seq_len"):
        raise ConversionError(
            f"ChatGLM3 config key 'pre_seq_len' is {config['pre_seq_len']!r}: the checkpoint "
            "contains a p-tuning prefix, which GlmForCausalLM has no place for. Convert the "
            "base checkpoint without the prefix."
        )


def _positive_int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        state = "missing" if key not in config else f"{value!r}"
        raise ConversionError(
            f"ChatGLM3 config key {key!r} is {state}; expected a positive integer."
        )
    return value


def _number(config: dict[str, Any], key: str, *, default: float) -> float:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise ConversionError(
            f"ChatGLM3 config key {key!r} is {value!r}; expected a positive number."
        )
    return float(value)


def _validate_stop_token_ids(stop_token_ids: list[int], vocab_size: int) -> list[int]:
    if not stop_token_ids:
        raise ConversionError("stop_token_ids is empty; pass at least the end-of-sequence id.")
    for token_id in stop_token_ids:
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            raise ConversionError(f"Stop token id {token_id!r} is not an integer.")
        if not 0 <= token_id < vocab_size:
            raise ConversionError(
                f"Stop token id {token_id} is outside the vocabulary of {vocab_size} ids."
            )
    # dict.fromkeys drops repeats and keeps the order.
    return list(dict.fromkeys(stop_token_ids))


# checkpoint


def convert_checkpoint(
    src: Path,
    dst: Path,
    *,
    tokenizer: Callable[[Path, Path], None] | None = None,
    stop_token_ids: list[int] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Convert the ChatGLM3 checkpoint folder ``src`` to a GlmForCausalLM folder ``dst``.

    ``src`` contains config.json and either model*.safetensors or pytorch_model*.bin weights,
    one file or shards with their index file. ``dst`` receives config.json,
    generation_config.json and safetensors weights in the source dtype, split into files of at
    most ``max_shard_bytes`` (a single larger tensor gets a file of its own) with
    model.safetensors.index.json when there is more than one. Source files are read one at a
    time, so peak memory is about one source file plus twice ``max_shard_bytes``.

    ``stop_token_ids`` become ``eos_token_id`` in both configs, so generation stops on them.
    When it is None and ``src`` contains ChatGLM3's tokenizer.model, the ids are the
    end-of-sequence id, <|user|> and <|observation|>. Otherwise only the end-of-sequence id is
    used. License files of ``src`` (names containing "LICENSE", such as ChatGLM3's
    MODEL_LICENSE) are copied, because their terms apply to the converted weights too.
    ``tokenizer``, when given, is called as ``tokenizer(src, staging_folder)`` to write
    the tokenizer files next to the weights.

    The output is written to a hidden sibling folder and renamed to ``dst`` at the end, so a
    failed conversion leaves no partial ``dst``. Returns ``dst``. Raises ConversionError on an
    unsupported config, a missing, unknown or misshapen weight, or a ``dst`` that exists and is
    not empty.
    """
    src = Path(src)
    dst = Path(dst)
    started = time.perf_counter()
    if max_shard_bytes <= 0:
        raise ConversionError(f"max_shard_bytes is {max_shard_bytes}; expected a positive size.")

    chatglm_config = _read_json_object(src / "config.json", description="ChatGLM3 config")
    if stop_token_ids is None:
        stop_token_ids = _stop_token_ids_from_tokenizer(src, chatglm_config)
    glm_config = convert_config(chatglm_config, stop_token_ids=stop_token_ids)
    layout = _layout_from_config(chatglm_config)
    weight_files, indexed_names = _find_weight_files(src)
    expected_shapes = layout.source_shapes()
    if indexed_names is not None:
        _check_weight_names(indexed_names, expected_shapes, src)
    _check_output_folder(dst)

    with _staging_folder(dst) as staging:
        writer = _ShardWriter(staging, max_shard_bytes)
        seen: set[str] = set()
        for weight_file in weight_files:
            for name, tensor in _read_weight_file(weight_file):
                _check_source_tensor(name, tensor, expected_shapes, weight_file)
                if name in seen:
                    raise ConversionError(
                        f"Weight {name!r} occurs in more than one file of {str(src)!r}."
                    )
                seen.add(name)
                for native_name, native_tensor in _convert_tensor(name, tensor, layout):
                    writer.add(native_name, native_tensor)
                if name == "transformer.embedding.word_embeddings.weight":
                    glm_config.dtype = tensor.dtype
        missing = sorted(set(expected_shapes) - seen)
        if missing:
            raise ConversionError(
                f"Checkpoint {str(src)!r} is missing {len(missing)} weight(s), first "
                f"{missing[0]!r}; check that every weight file of the checkpoint is present."
            )
        file_count = writer.finish()

        glm_config.save_pretrained(staging)
        _generation_config(src, glm_config).save_pretrained(staging)
        _copy_license_files(src, staging)
        if tokenizer is not None:
            tokenizer(src, staging)

    logger.info(
        "Converted ChatGLM3 checkpoint %r (%d weight file(s)) to GlmForCausalLM %r "
        "(%d safetensors file(s)) in %.1f s",
        str(src),
        len(weight_files),
        str(dst),
        file_count,
        time.perf_counter() - started,
    )
    return dst


def _stop_token_ids_from_tokenizer(src: Path, chatglm_config: dict[str, Any]) -> list[int] | None:
    model_file = src / "tokenizer.model"
    eos_token_id = chatglm_config.get("eos_token_id")
    if not model_file.is_file():
        logger.warning(
            "No tokenizer.model in %r and no stop_token_ids: the converted model stops "
            "generating only on the end-of-sequence id %r, not on <|user|> or <|observation|>",
            str(src),
            eos_token_id,
        )
        return None
    try:
        import sentencepiece
    except ImportError as exc:
        raise ConversionError(
            "Reading the ids of <|user|> and <|observation|> from tokenizer.model needs the "
            "sentencepiece package: install it or pass stop_token_ids."
        ) from exc
    try:
        piece_count = sentencepiece.SentencePieceProcessor(model_file=str(model_file)).vocab_size()
    except (OSError, RuntimeError) as exc:
        raise ConversionError(f"Failed to read {str(model_file)!r}: {exc}") from exc
    return [
        eos_token_id,
        piece_count + _USER_TOKEN_OFFSET,
        piece_count + _OBSERVATION_TOKEN_OFFSET,
    ]


def _generation_config(src: Path, glm_config: GlmConfig) -> GenerationConfig:
    settings: dict[str, Any] = {}
    source_file = src / "generation_config.json"
    if source_file.is_file():
        source = _read_json_object(source_file, description="generation config")
        settings = {key: source[key] for key in _GENERATION_KEYS if key in source}
    return GenerationConfig(
        **settings,
        eos_token_id=glm_config.eos_token_id,
        pad_token_id=glm_config.pad_token_id,
        bos_token_id=None,
    )


def _copy_license_files(src: Path, dst: Path) -> None:
    for path in sorted(src.iterdir()):
        if path.is_file() and "LICENSE" in path.name.upper():
            shutil.copy2(path, dst / path.name)


def _find_weight_files(src: Path) -> tuple[list[Path], set[str] | None]:
    """Return the weight files of ``src`` and, for a sharded checkpoint, the indexed names."""
    for index_name, single_name in _SOURCE_WEIGHT_FILES:
        index_file = src / index_name
        if index_file.is_file():
            index = _read_json_object(index_file, description="weight index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(
                    f"{str(index_file)!r} has no 'weight_map' object; the index is invalid."
                )
            files = [src / name for name in sorted(set(weight_map.values()))]
            for path in files:
                if not path.is_file():
                    raise ConversionError(
                        f"Weight file {str(path)!r}, listed in {index_name}, is missing."
                    )
            return files, set(weight_map)
        if (src / single_name).is_file():
            return [src / single_name], None

    expected = ", ".join(name for pair in _SOURCE_WEIGHT_FILES for name in pair)
    raise ConversionError(f"No weights found in {str(src)!r}: expected one of {expected}.")


def _check_weight_names(
    names: set[str], expected_shapes: dict[str, tuple[int, ...]], src: Path
) -> None:
    unknown = sorted(names - set(expected_shapes) - _DROPPED_WEIGHTS)
    if unknown:
        raise ConversionError(
            f"Checkpoint {str(src)!r} contains weight {unknown[0]!r}, which is not part of "
            f"ChatGLM3's layout for its config ({len(unknown)} unknown weight(s) in all)."
        )
    missing = sorted(set(expected_shapes) - names)
    if missing:
        raise ConversionError(
            f"Checkpoint {str(src)!r} is missing {len(missing)} weight(s), first "
            f"{missing[0]!r}; check that its config.json matches the weights."
        )


def _check_source_tensor(
    name: str,
    tensor: torch.Tensor,
    expected_shapes: dict[str, tuple[int, ...]],
    weight_file: Path,
) -> None:
    if name in _DROPPED_WEIGHTS:
        return
    if name not in expected_shapes:
        raise ConversionError(
            f"{str(weight_file)!r} contains weight {name!r}, which is not part of ChatGLM3's "
            "layout for its config."
        )
    if tuple(tensor.shape) != expected_shapes[name]:
        raise ConversionError(
            f"Weight {name!r} in {str(weight_file)!r} has shape {tuple(tensor.shape)}; the "
            f"config implies {expected_shapes[name]}."
        )
    if not tensor.is_floating_point():
        raise ConversionError(
            f"Weight {name!r} in {str(weight_file)!r} has dtype {tensor.dtype}; only float "
            "weights can be converted."
        )


def _read_weight_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tensors of one weight file, loading as few of them at a time as the format
    allows: one for safetensors, the whole file (memory-mapped when possible) for .bin."""
    if path.name.endswith(".safetensors"):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except SafetensorError as exc:
            raise ConversionError(f"Failed to read {str(path)!r}: {exc}") from exc
        return

    # Files in torch's zip format (the default since torch 1.6) can be memory-mapped, so the
    # operating system pages the tensors in as they are converted.
    try:
        state = torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ConversionError(f"Failed to read {str(path)!r}: {exc}") from exc
    if not isinstance(state, dict):
        raise ConversionError(
            f"{str(path)!r} contains a {type(state).__name__}, not a dict of tensors."
        )
    try:
        for name in list(state):
            yield name, state.pop(name)
    finally:
        del state


def _convert_tensor(
    name: str, tensor: torch.Tensor, layout: _Layout
) -> list[tuple[str, torch.Tensor]]:
    """Return the native GLM tensors that replace the ChatGLM3 tensor ``name``.

    Every returned tensor owns its memory, so it outlives the source file it came from.
    """
    if name in _DROPPED_WEIGHTS:
        return []
    top_level = {
        "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "transformer.encoder.final_layernorm.weight": "model.norm.weight",
        "transformer.output_layer.weight": "lm_head.weight",
    }
    if name in top_level:
        return [(top_level[name], _own(tensor))]

    match = _LAYER_KEY.fullmatch(name)
    if match is None:
        raise ConversionError(f"Weight {name!r} is not part of ChatGLM3's layout.")
    prefix = f"model.layers.{match['layer']}."
    rest = match["rest"]
    if rest.startswith("self_attention.query_key_value."):
        suffix = rest.rsplit(".", 1)[1]
        query, key, value = _split_query_key_value(tensor, layout)
        return [
            (f"{prefix}self_attn.q_proj.{suffix}", query),
            (f"{prefix}self_attn.k_proj.{suffix}", key),
            (f"{prefix}self_attn.v_proj.{suffix}", value),
        ]
    renamed = {
        "input_layernorm.weight": "input_layernorm.weight",
        "post_attention_layernorm.weight": "post_attention_layernorm.weight",
        "self_attention.dense.weight": "self_attn.o_proj.weight",
        # Both layouts put the gate rows first and compute silu(gate) * up.
        "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
        "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
    }
    if rest not in renamed:
        raise ConversionError(f"Weight {name!r} is not part of ChatGLM3's layout.")
    return [(prefix + renamed[rest], _own(tensor))]


def _split_query_key_value(
    tensor: torch.Tensor, layout: _Layout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Rows are all query heads, then the key groups, then the value groups, each head_dim rows.
    # The row order within a head stays: native GLM rotates the same (2i, 2i+1) pairs.
    query, key, value = torch.split(
        tensor, [layout.query_rows, layout.key_value_rows, layout.key_value_rows], dim=0
    )
    return _own(query), _own(key), _own(value)


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """Return a contiguous copy, detached from a memory-mapped or larger source storage."""
    return tensor.clone(memory_format=torch.contiguous_format)


class _ShardWriter:
    """Collects converted tensors and writes them as safetensors files of bounded size."""

    def __init__(self, folder: Path, max_shard_bytes: int) -> None:
        self._folder = folder
        self._max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self._max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self._total_bytes += size

    def _flush(self) -> None:
        # Final names need the file count, so files get a numbered name first and are renamed
        # in finish().
        path = self._folder / f"part-{len(self._files) + 1:05d}.safetensors"
        _save_safetensors(self._pending, path)
        self._files.append((path, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def finish(self) -> int:
        """Write the last file and the index, and return the number of safetensors files."""
        if self._pending:
            self._flush()
        if len(self._files) == 1:
            self._files[0][0].rename(self._folder / "model.safetensors")
            return 1

        weight_map: dict[str, str] = {}
        count = len(self._files)
        for number, (path, names) in enumerate(self._files, start=1):
            final_name = f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self._folder / final_name)
            weight_map.update(dict.fromkeys(names, final_name))
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
        (self._folder / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        return count


# adapter


def convert_adapter(src: Path, dst: Path, *, base: Path) -> Path:
    """Convert a peft LoRA adapter trained on a ChatGLM3 checkpoint to one for its conversion.

    ``base`` is the converted GlmForCausalLM folder, which becomes ``base_model_name_or_path``.
    The converted adapter computes the same update: the B rows of ``query_key_value`` split
    into q_proj, k_proj and v_proj like the base weight, each with a copy of the shared A
    matrix. ``dense``, ``dense_h_to_4h`` and ``dense_4h_to_h`` become ``o_proj``,
    ``gate_up_proj`` and ``down_proj`` unchanged. r and lora_alpha stay, so the scaling does.

    ``dst`` receives adapter_config.json and adapter_model.safetensors only: tokenizer files
    saved next to a ChatGLM3 adapter need ChatGLM3's remote code and are not copied. The output
    is written to a hidden sibling folder and renamed at the end. Returns ``dst``.

    Raises ConversionError on an adapter other than plain LoRA on those four modules (DoRA,
    modules_to_save, trained biases, rank_pattern or alpha_pattern entries), on weights that do
    not fit ``base``, or on a ``dst`` that exists and is not empty.
    """
    src = Path(src)
    dst = Path(dst)
    base = Path(base)

    adapter_config = _read_json_object(src / ADAPTER_CONFIG_FILE, description="adapter config")
    _validate_adapter_config(adapter_config, src)
    layout = _layout_from_native_config(base)
    weights = _read_adapter_weights(src)
    converted = _convert_adapter_weights(weights, layout, adapter_config["r"], src)
    _check_output_folder(dst)

    native_config = dict(adapter_config)
    native_config["target_modules"] = sorted(
        {
            native
            for target in adapter_config["target_modules"]
            for native in _ADAPTER_TARGETS[target]
        }
    )
    native_config["base_model_name_or_path"] = str(base)

    with _staging_folder(dst) as staging:
        _save_safetensors(converted, staging / ADAPTER_SAFETENSORS_FILE)
        (staging / ADAPTER_CONFIG_FILE).write_text(
            json.dumps(native_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )

    logger.info(
        "Converted ChatGLM3 LoRA adapter %r (%d tensors) to %r for base %r",
        str(src),
        len(weights),
        str(dst),
        str(base),
    )
    return dst


def _validate_adapter_config(config: dict[str, Any], src: Path) -> None:
    where = f"{str(src / ADAPTER_CONFIG_FILE)!r}"
    if config.get("peft_type") != "LORA":
        raise ConversionError(
            f"{where} has peft_type {config.get('peft_type')!r}; only LoRA adapters "
            "('LORA') can be converted."
        )
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ConversionError(f"{where} has r {rank!r}; expected a positive integer.")

    # Each of these options changes which weights the adapter contains or how peft applies
    # them, in ways that the row split below does not translate.
    rejected = [
        ("use_dora", bool(config.get("use_dora")), "DoRA adapters"),
        ("modules_to_save", bool(config.get("modules_to_save")), "fully trained modules"),
        ("bias", config.get("bias", "none") != "none", "trained biases"),
        ("lora_bias", bool(config.get("lora_bias")), "biases on lora_B"),
        ("fan_in_fan_out", bool(config.get("fan_in_fan_out")), "transposed weights"),
        ("rank_pattern", bool(config.get("rank_pattern")), "per-module ranks"),
        ("alpha_pattern", bool(config.get("alpha_pattern")), "per-module alphas"),
        ("layer_replication", bool(config.get("layer_replication")), "replicated layers"),
        ("exclude_modules", bool(config.get("exclude_modules")), "excluded module names"),
        ("target_parameters", bool(config.get("target_parameters")), "targeted parameters"),
        (
            "trainable_token_indices",
            bool(config.get("trainable_token_indices")),
            "trained token embeddings",
        ),
        ("megatron_config", bool(config.get("megatron_config")), "Megatron layers"),
    ]
    for key, present, meaning in rejected:
        if present:
            raise ConversionError(
                f"{where} sets {key!r} to {config.get(key)!r} ({meaning}), which the "
                "conversion does not support; only plain LoRA on query_key_value, dense, "
                "dense_h_to_4h and dense_4h_to_h can be converted."
            )

    layers_pattern = config.get("layers_pattern")
    if layers_pattern not in (None, "layers", ["layers"]):
        raise ConversionError(
            f"{where} has layers_pattern {layers_pattern!r}; only 'layers' (or none), which "
            "both layouts share, can be converted."
        )

    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise ConversionError(
            f"{where} has target_modules {targets!r}; expected a list of module names among "
            f"{', '.join(_ADAPTER_TARGETS)}. A regular expression cannot be converted."
        )
    for target in targets:
        if target not in _ADAPTER_TARGETS:
            raise ConversionError(
                f"{where} targets module {target!r}, which the conversion does not support; "
                f"supported target modules: {', '.join(_ADAPTER_TARGETS)}."
            )


def _layout_from_native_config(base: Path) -> _Layout:
    config_file = base / "config.json"
    if not config_file.is_file():
        raise ConversionError(
            f"Base model {str(base)!r} not found: pass the folder that convert_checkpoint "
            "wrote (containing config.json)."
        )
    config = _read_json_object(config_file, description="base model config")
    if config.get("model_type") != GLM_MODEL_TYPE:
        hint = (
            " Convert the ChatGLM3 checkpoint first and pass the converted folder."
            if config.get("model_type") == CHATGLM_MODEL_TYPE
            else ""
        )
        raise ConversionError(
            f"Base model {str(base)!r} has model_type {config.get('model_type')!r}; expected "
            f"{GLM_MODEL_TYPE!r} (a converted ChatGLM3 checkpoint).{hint}"
        )
    try:
        return _Layout(
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=int(config["hidden_size"]),
            ffn_hidden_size=int(config["intermediate_size"]),
            num_heads=int(config["num_attention_heads"]),
            num_key_value_heads=int(config["num_key_value_heads"]),
            head_dim=int(config["head_dim"]),
            vocab_size=int(config["vocab_size"]),
            qkv_bias=bool(config.get("attention_bias", True)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConversionError(
            f"Base model config {str(config_file)!r} lacks a valid {exc}; convert the ChatGLM3 "
            "checkpoint again."
        ) from exc


def _read_adapter_weights(src: Path) -> dict[str, torch.Tensor]:
    safetensors_file = src / ADAPTER_SAFETENSORS_FILE
    bin_file = src / ADAPTER_BIN_FILE
    try:
        if safetensors_file.is_file():
            return load_file(str(safetensors_file))
        if bin_file.is_file():
            state = torch.load(bin_file, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ConversionError(
                    f"{str(bin_file)!r} contains a {type(state).__name__}, not a dict of tensors."
                )
            return state
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
        raise ConversionError(f"Failed to read the adapter weights in {str(src)!r}: {exc}") from exc
    raise ConversionError(
        f"Adapter {str(src)!r} is missing its weights ({ADAPTER_SAFETENSORS_FILE} or "
        f"{ADAPTER_BIN_FILE})."
    )


def _convert_adapter_weights(
    weights: dict[str, torch.Tensor], layout: _Layout, rank: int, src: Path
) -> dict[str, torch.Tensor]:
    # (in_features, out_features) of each ChatGLM3 target in the base model.
    features = {
        "query_key_value": (layout.hidden_size, layout.query_rows + 2 * layout.key_value_rows),
        "dense": (layout.query_rows, layout.hidden_size),
        "dense_h_to_4h": (layout.hidden_size, 2 * layout.ffn_hidden_size),
        "dense_4h_to_h": (layout.ffn_hidden_size, layout.hidden_size),
    }
    converted: dict[str, torch.Tensor] = {}
    modules: dict[str, set[str]] = {}
    for key, tensor in weights.items():
        match = _ADAPTER_KEY.fullmatch(key)
        if match is None:
            raise ConversionError(
                f"Adapter {str(src)!r} contains weight {key!r}, which is not a LoRA A or B "
                "matrix of query_key_value, dense, dense_h_to_4h or dense_4h_to_h."
            )
        layer = int(match["layer"])
        if layer >= layout.num_layers:
            raise ConversionError(
                f"Adapter weight {key!r} is for layer {layer}, but the base model has "
                f"{layout.num_layers} layers."
            )
        target = _ADAPTER_MODULE_PATHS[match["module"]]
        matrix = match["matrix"]
        in_features, out_features = features[target]
        expected = (rank, in_features) if matrix == "lora_A" else (out_features, rank)
        if tuple(tensor.shape) != expected:
            raise ConversionError(
                f"Adapter weight {key!r} has shape {tuple(tensor.shape)}; r {rank} and the base "
                f"model imply {expected}. Check that --base is this adapter's converted base."
            )
        modules.setdefault(f"{layer}.{target}", set()).add(matrix)

        prefix = f"base_model.model.model.layers.{layer}."
        if target == "query_key_value" and matrix == "lora_B":
            parts = _split_query_key_value(tensor, layout)
        elif target == "query_key_value":
            # x @ A.T feeds all three row blocks of B, so each split module needs A.
            parts = (_own(tensor), _own(tensor), _own(tensor))
        else:
            parts = (_own(tensor),)
        for native, part in zip(_ADAPTER_TARGETS[target], parts, strict=True):
            converted[f"{prefix}{_NATIVE_MODULE_PATHS[native]}.{matrix}.weight"] = part

    for module, matrices in sorted(modules.items()):
        if matrices != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - matrices).pop()
            raise ConversionError(
                f"Adapter {str(src)!r} has no {missing} matrix for layer module {module!r}."
            )
    return converted


# files


def _read_json_object(path: Path, *, description: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConversionError(f"The {description} {str(path)!r} is not found.")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"Failed to read the {description} {str(path)!r}: {exc}") from exc
    if not isinstance(value, dict):
        raise ConversionError(
            f"The {description} {str(path)!r} is invalid: expected a JSON object."
        )
    return value


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
    # safetensors 0.8 creates the file readable by its owner only, and weights are not secret.
    path.chmod(0o644)


def _check_output_folder(dst: Path) -> None:
    if not dst.exists():
        return
    if not dst.is_dir():
        raise ConversionError(
            f"Output {str(dst)!r} exists and is not a folder; choose a new output folder."
        )
    if any(dst.iterdir()):
        raise ConversionError(
            f"Output folder {str(dst)!r} is not empty; choose a new output folder or delete "
            "this one first."
        )


@contextlib.contextmanager
def _staging_folder(dst: Path) -> Iterator[Path]:
    """Yield a hidden sibling folder of ``dst`` and rename it to ``dst`` when the block ends
    without an exception. The staging folder is deleted in either case."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: a staging folder left by a process killed mid-write is not deleted automatically.
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    # mkdtemp creates the folder readable by its owner only, and a model is not secret.
    staging.chmod(0o755)
    try:
        yield staging
        try:
            if dst.is_dir():
                # Checked empty before conversion, and rename cannot replace it on Windows.
                dst.rmdir()
            staging.rename(dst)
        except OSError as exc:
            raise ConversionError(
                f"Failed to move the converted files into {str(dst)!r} ({exc}); the folder "
                "was probably created or filled during the conversion, so choose a new "
                "output folder."
            ) from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# conversion on first use

# Two generators or trainers started in one process convert a folder only once.
_first_use_lock = threading.Lock()
# Module names that only ChatGLM3's original layout has.
_ORIGINAL_ADAPTER_TARGETS = frozenset({"query_key_value", "dense_h_to_4h", "dense_4h_to_h"})


def _fingerprint(folder: Path, names: Iterator[str] | list[str]) -> str:
    """Return a short hash of a folder's config and the sizes and times of its files."""
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for name in sorted(names):
        path = folder / name
        if path.is_file():
            stat = path.stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def _tokenizer_writer(src: Path) -> Callable[[Path, Path], None] | None:
    if not (src / "tokenizer.model").is_file():
        return None
    from training.chatglm3_tokenizer import convert_tokenizer

    def write(source: Path, target: Path) -> None:
        convert_tokenizer(source, target)

    return write


def ensure_native_checkpoint(src: Path, models_dir: Path) -> Path:
    """Return a native conversion of the ChatGLM3 folder ``src``, converting it on first use.

    The conversion is kept under ``models_dir`` and reused while the source files are unchanged.
    """
    if not (src / "tokenizer.model").is_file():
        raise ConversionError(
            f"The ChatGLM3 folder {str(src)!r} has no tokenizer.model, which serving and "
            "training need; copy it from the ChatGLM3 model repository into that folder."
        )
    names = [path.name for path in src.iterdir() if path.is_file()]
    target = models_dir / f"{src.name}-glm-{_fingerprint(src, names)}"
    with _first_use_lock:
        if (target / "config.json").is_file():
            return target
        logger.info("Converting the ChatGLM3 checkpoint %s once into %s", src, target)
        models_dir.mkdir(parents=True, exist_ok=True)
        convert_checkpoint(src, target, tokenizer=_tokenizer_writer(src))
    return target


def is_chatglm3_adapter(path: Path) -> bool:
    """Return whether the peft adapter in ``path`` targets ChatGLM3's original module names."""
    try:
        config = json.loads((path / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    return bool(_ORIGINAL_ADAPTER_TARGETS.intersection(targets))


def ensure_native_adapter(src: Path, base: Path, models_dir: Path) -> Path:
    """Return a conversion of the ChatGLM3 adapter ``src`` for the converted ``base``."""
    names = [ADAPTER_CONFIG_FILE, ADAPTER_SAFETENSORS_FILE, ADAPTER_BIN_FILE]
    target = models_dir / "adapters" / f"{src.name}-glm-{_fingerprint(src, names)}-{base.name}"
    with _first_use_lock:
        if (target / ADAPTER_CONFIG_FILE).is_file():
            return target
        logger.info("Converting the ChatGLM3 adapter %s once into %s", src, target)
        target.parent.mkdir(parents=True, exist_ok=True)
        convert_adapter(src, target, base=base)
    return target


def native_target_modules(targets: list[str]) -> list[str]:
    """Return the native GLM module names for LoRA targets named in ChatGLM3's layout.

    Names that are already native pass through, so a recipe written for the ChatGLM3 demo
    (``target_modules: query_key_value``) trains the converted model.
    """
    native: list[str] = []
    for name in targets:
        for replacement in _ADAPTER_TARGETS.get(name, (name,)):
            if replacement not in native:
                native.append(replacement)
    return native
