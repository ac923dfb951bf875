"""Merge a peft LoRA adapter into its base model and write a plain transformers model folder.

The output folder loads with ``AutoModelForCausalLM`` alone, without peft, so it can serve as
``generator.local.model``. It contains float32 safetensors weights, config.json, the generation
config and the tokenizer with its chat template, and no adapter files.

Merging adds each LoRA update to the dense weight it modifies, which needs the base weights in a
float dtype. A quantized base (a ``quantization_config`` in config.json, a .gguf file, or a model
that transformers reports as loaded in 4 or 8 bit) is rejected before any weight is merged.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from core.config import resolve_path
from core.errors import GeneratorUnavailable
from core.generation.embedded import ensure_embedded_model

logger = logging.getLogger(__name__)

# The `base` value that selects the project's embedded SmolLM2 model.
EMBEDDED = "embedded"
DEFAULT_MODELS_DIR = "var/models"

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
BASE_MODEL_KEY = "base_model_name_or_path"

_DEQUANTIZE_HINT = (
    "Merge into the unquantized float model instead: convert or dequantize it to a plain "
    "Hugging Face folder first, or pass --base embedded to use the embedded model's converted "
    f"float folder ({DEFAULT_MODELS_DIR}/smollm2-135m-instruct)."
)


class MergeError(ValueError):
    """The adapter, base model or output folder is invalid for a merge.

    The message names the value at fault and what to do about it.
    """


def merge_adapter(
    adapter_dir: Path,
    out_dir: Path,
    *,
    base: str | Path | None = None,
    models_dir: Path | None = None,
) -> Path:
    """Merge the LoRA adapter in ``adapter_dir`` into its base model and write it to ``out_dir``.

    ``base`` is a Hugging Face model folder or ``"embedded"``. When it is None, the folder named
    by ``base_model_name_or_path`` in adapter_config.json is used. ``models_dir`` is where the
    embedded model is converted, ``var/models`` under the project root by default.

    The tokenizer comes from the adapter folder when it contains tokenizer_config.json, otherwise
    from the base folder. The model is written to a hidden sibling folder and renamed to
    ``out_dir`` at the end, so a failed merge leaves no partial ``out_dir``. Returns ``out_dir``.

    Raises MergeError on an invalid adapter, a missing or quantized base model, or an
    ``out_dir`` that exists and is not empty.
    """
    adapter_dir = Path(adapter_dir)
    out_dir = Path(out_dir)
    started = time.perf_counter()

    adapter_config = _read_adapter_config(adapter_dir)
    _check_out_dir(out_dir)
    base_dir = _resolve_base(base, adapter_config, adapter_dir, models_dir)
    _reject_quantized_config(base_dir)

    has_own_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer_dir = adapter_dir if has_own_tokenizer else base_dir
    tokenizer = _load_tokenizer(tokenizer_dir)

    model = _load_base_model(base_dir)
    _resize_embeddings_for(tokenizer, tokenizer_dir, model, base_dir)
    merged = _merge(model, adapter_dir, base_dir)

    _write_atomically(merged, tokenizer, out_dir)
    logger.info(
        "Merged adapter %r into base model %r and wrote %r in %.1f s",
        str(adapter_dir),
        str(base_dir),
        str(out_dir),
        time.perf_counter() - started,
    )
    return out_dir


# inputs


def _read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    config_path = adapter_dir / ADAPTER_CONFIG_FILE
    if not config_path.is_file():
        raise MergeError(
            f"Adapter {str(adapter_dir)!r} not found: pass the folder that peft's "
            f"save_pretrained wrote, which contains {ADAPTER_CONFIG_FILE}."
        )
    if not any((adapter_dir / name).is_file() for name in ADAPTER_WEIGHT_FILES):
        raise MergeError(
            f"Adapter {str(adapter_dir)!r} is missing its weights "
            f"({' or '.join(ADAPTER_WEIGHT_FILES)}); save the adapter again with peft's "
            "save_pretrained."
        )

    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MergeError(f"Failed to read {str(config_path)!r}: {exc}") from exc
    if not isinstance(config, dict):
        raise MergeError(f"{str(config_path)!r} is invalid: expected a JSON object.")

    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise MergeError(
            f"Adapter {str(adapter_dir)!r} has peft_type {peft_type!r}; only LoRA adapters "
            "(peft_type 'LORA') can be merged."
        )
    return config


def _check_out_dir(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise MergeError(
            f"Output {str(out_dir)!r} exists and is not a folder; choose a new output folder."
        )
    if any(out_dir.iterdir()):
        raise MergeError(
            f"Output folder {str(out_dir)!r} is not empty; choose a new output folder or "
            "delete this one first."
        )


def _resolve_base(
    base: str | Path | None,
    adapter_config: dict[str, Any],
    adapter_dir: Path,
    models_dir: Path | None,
) -> Path:
    if base is None:
        base = _base_from_adapter_config(adapter_config, adapter_dir)
    elif base == EMBEDDED:
        target = models_dir if models_dir is not None else resolve_path(DEFAULT_MODELS_DIR)
        try:
            return ensure_embedded_model(target)
        except GeneratorUnavailable as exc:
            raise MergeError(str(exc)) from exc

    path = Path(base)
    if path.is_file() and path.suffix.lower() == ".gguf":
        raise MergeError(
            f"Base model {str(path)!r} is a GGUF file, which stores quantized weights. "
            + _DEQUANTIZE_HINT
        )
    if not (path / "config.json").is_file():
        raise MergeError(
            f"Base model {str(path)!r} not found: pass --base with a Hugging Face model folder "
            f"(containing config.json) or {EMBEDDED!r}."
        )
    return path


def _base_from_adapter_config(adapter_config: dict[str, Any], adapter_dir: Path) -> Path:
    config_path = adapter_dir / ADAPTER_CONFIG_FILE
    value = adapter_config.get(BASE_MODEL_KEY)
    if not value:
        raise MergeError(
            f"{str(config_path)!r} has no {BASE_MODEL_KEY!r}; pass the base model with --base "
            f"(a Hugging Face model folder or {EMBEDDED!r})."
        )

    path = Path(value)
    # A GGUF file passes through, so that the caller reports it as a quantized base.
    if not path.is_dir() and not path.is_file():
        raise MergeError(
            f"The base model {value!r} in {BASE_MODEL_KEY!r} of {str(config_path)!r} is not an "
            f"existing folder; pass the base model with --base (a Hugging Face model folder or "
            f"{EMBEDDED!r})."
        )
    return path


def _reject_quantized_config(base_dir: Path) -> None:
    config_path = base_dir / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MergeError(f"Failed to read {str(config_path)!r}: {exc}") from exc

    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise MergeError(
            f"Base model {str(base_dir)!r} is quantized (quantization_config with quant_method "
            f"{method!r} in config.json), and requantizing the merged weights would round "
            "away much of the adapter's small changes. " + _DEQUANTIZE_HINT
        )


# loading and merging


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise MergeError(f"Failed to load the tokenizer from {str(folder)!r}: {exc}") from exc
    if not tokenizer.chat_template:
        raise MergeError(
            f"The tokenizer in {str(folder)!r} has no chat template, which the merged chat model "
            "needs; save a tokenizer with a chat template into the adapter folder."
        )
    return tokenizer


def _load_base_model(base_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise MergeError(f"Failed to load the base model {str(base_dir)!r}: {exc}") from exc

    # A second check, for quantization that transformers applied without a
    # quantization_config in config.json.
    quantized = (
        getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
        or getattr(model, "is_quantized", False)
        or getattr(model, "hf_quantizer", None) is not None
    )
    if quantized:
        raise MergeError(f"Base model {str(base_dir)!r} loaded as quantized. " + _DEQUANTIZE_HINT)
    return model


def _resize_embeddings_for(tokenizer: Any, tokenizer_dir: Path, model: Any, base_dir: Path) -> None:
    # An adapter trained after adding tokens stores embeddings with one row per token, and peft
    # can load them only onto a base model with as many rows.
    token_count = len(tokenizer)
    row_count = model.get_input_embeddings().num_embeddings
    if token_count <= row_count:
        return
    logger.warning(
        "The tokenizer in %r has %d tokens but base model %r has %d embedding rows; "
        "resizing the embeddings to %d rows before loading the adapter",
        str(tokenizer_dir),
        token_count,
        str(base_dir),
        row_count,
        token_count,
    )
    model.resize_token_embeddings(token_count)


def _merge(model: Any, adapter_dir: Path, base_dir: Path) -> Any:
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise MergeError(
            f"Failed to load adapter {str(adapter_dir)!r} onto base model {str(base_dir)!r}: "
            f"{exc}. Check that the adapter was trained on this base model."
        ) from exc
    return peft_model.merge_and_unload()


# output


def _write_atomically(model: Any, tokenizer: Any, out_dir: Path) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: a staging folder left by a process killed mid-write is not deleted automatically.
    # Its name is "." and the output folder's name, then a random part and ".partial".
    staging = Path(
        tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent)
    )
    # mkdtemp creates the folder readable by its owner only; the model is not secret.
    staging.chmod(0o755)
    try:
        # transformers 5.x always writes safetensors, and its save_pretrained has no
        # safe_serialization option. It also writes generation_config.json.
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _move_into_place(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, out_dir: Path) -> None:
    try:
        if out_dir.is_dir():
            # An empty folder, checked before loading, which rename cannot replace on Windows.
            out_dir.rmdir()
        staging.rename(out_dir)
    except OSError as exc:
        raise MergeError(
            f"Failed to move the merged model into {str(out_dir)!r} ({exc}); the folder was "
            "probably created or filled during the merge, so choose a new output folder."
        ) from exc
