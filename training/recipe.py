"""Training recipes: the YAML file that ``mindharbor train --config`` reads.

The fields follow the ChatGLM3 fine-tuning demo's ``lora.yaml``, so a recipe
from there needs few changes: ``data_config`` (data folder and file names),
``max_input_length`` and ``max_output_length``, ``training_args`` (passed to
transformers' ``TrainingArguments``) and ``peft_config`` (passed to peft's
``LoraConfig``). MindHarbor adds ``model`` (the base model) and
``precision``. Demo keys that this trainer has no use for
(``predict_with_generate``, ``generation_config``, ``num_proc``) are accepted
and ignored with a warning.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.config import resolve_path
from core.errors import ConfigError

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
# Demo keys with no meaning here; a recipe that has them still loads.
_IGNORED_TRAINING_ARGS = ("predict_with_generate", "generation_config")
# Renamed in transformers since the demo was written.
_RENAMED_TRAINING_ARGS = {
    "evaluation_strategy": "eval_strategy",
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}
_DEFAULT_TRAINING_ARGS: dict[str, Any] = {
    "output_dir": "var/training/run",
    "report_to": "none",
    "remove_unused_columns": False,
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 100,
    "save_total_limit": 3,
}


@dataclass(slots=True)
class Recipe:
    """A parsed recipe; paths are resolved against the project root."""

    model: str
    data_dir: Path
    train_file: str
    val_file: str | None
    test_file: str | None
    max_input_length: int
    max_output_length: int
    precision: str
    training_args: dict[str, Any]
    peft_config: dict[str, Any]
    # The file as read, kept with every adapter trained from it.
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def max_length(self) -> int:
        """Tokens per training sample: history plus reply."""
        return self.max_input_length + self.max_output_length

    @property
    def output_dir(self) -> Path:
        return resolve_path(self.training_args["output_dir"])

    @property
    def target_modules(self) -> list[str] | None:
        modules = self.peft_config.get("target_modules")
        return [modules] if isinstance(modules, str) else modules

    def path(self, name: str | None) -> Path | None:
        return self.data_dir / name if name else None


def load_recipe(
    path: Path,
    *,
    data_dir: Path | None = None,
    output_dir: Path | None = None,
    model: str | None = None,
    max_steps: int | None = None,
) -> Recipe:
    """Read and check a recipe; the keyword arguments override its values."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"Cannot read the recipe {str(path)!r}: {exc.strerror}.") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"The recipe {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"The recipe {str(path)!r} must be a mapping of settings.")

    data_config = raw.get("data_config") or {}
    training_args = dict(_DEFAULT_TRAINING_ARGS)
    for key, value in (raw.get("training_args") or {}).items():
        if key in _IGNORED_TRAINING_ARGS:
            logger.warning("Recipe key training_args.%s is not used by this trainer", key)
            continue
        training_args[_RENAMED_TRAINING_ARGS.get(key, key)] = value
    if "num_proc" in data_config:
        logger.info("Recipe key data_config.num_proc is not used: tokenising runs in one process")
    if output_dir is not None:
        training_args["output_dir"] = str(output_dir)
    if max_steps is not None:
        training_args["max_steps"] = max_steps

    peft_config = dict(raw.get("peft_config") or {})
    peft_type = str(peft_config.pop("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ConfigError(f"peft_config.peft_type must be LORA; got {peft_type!r}.")
    peft_config.setdefault("task_type", "CAUSAL_LM")

    recipe = Recipe(
        model=str(model or raw.get("model") or "embedded"),
        data_dir=resolve_path(data_dir or data_config.get("data_dir") or "var/dataset"),
        train_file=str(data_config.get("train_file") or "train.jsonl"),
        val_file=data_config.get("val_file", "validation.jsonl"),
        test_file=data_config.get("test_file", "test.jsonl"),
        max_input_length=_positive(raw, "max_input_length", 512),
        max_output_length=_positive(raw, "max_output_length", 512),
        precision=str(raw.get("precision") or "auto"),
        training_args=training_args,
        peft_config=peft_config,
        raw=copy.deepcopy(raw),
    )
    if recipe.precision not in PRECISIONS:
        raise ConfigError(
            f"precision must be one of {', '.join(PRECISIONS)}; got {recipe.precision!r}."
        )
    if training_args.get("bf16") or training_args.get("fp16"):
        raise ConfigError(
            "Set `precision: bfloat16` or `precision: float16` in the recipe instead of "
            "training_args.bf16 / fp16; the trainer checks that the device supports it."
        )
    return recipe


def _positive(raw: dict[str, Any], key: str, default: int) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive whole number of tokens; got {value!r}.")
    return value
