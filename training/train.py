"""LoRA fine-tuning with peft on transformers' Trainer: ``mindharbor train``.

The dialogues are tokenised with the base model's own chat template and
trained on the assistant turns only (``training.tokenize``). The run writes
checkpoints under the recipe's output folder, a ``log.jsonl`` of losses and
learning rates, and finally ``adapter/``: the LoRA weights, the tokenizer and
``mindharbor.json`` (base model, recipe, data files with their hashes,
metrics). Before it reports success, the saved adapter is checked: it must
hold LoRA weights for every module that the target modules matched, and
loading it must change the base model's output.

Under ``accelerate launch`` the same code runs data-parallel; only the main
process writes the adapter and checks it.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import Trainer

from core.errors import ConfigError
from training.dataset import file_sha256, jsonl_items, validate
from training.recipe import Recipe
from training.tokenize import IGNORE_INDEX, Sample, build_samples

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
METADATA_FILE = "mindharbor.json"
RESULT_FILE = "training.json"


class TrainingError(RuntimeError):
    """Raised when training cannot finish; the message names the cause and the fix."""


class NonFiniteLoss(TrainingError):
    def __init__(self, step: int, value: float) -> None:
        super().__init__(
            f"Training stopped at step {step}: the loss is {value}. Lower "
            "training_args.learning_rate, check the data, or train with `precision: float32`; "
            "no adapter was written from this run."
        )
        self.step = step


@dataclass(slots=True)
class TrainResult:
    adapter_dir: Path
    base_model: str
    train_samples: int
    validation_samples: int
    # Dialogues dropped while reading, by reason.
    dropped: dict[str, int]
    steps: int
    train_loss: float | None
    eval_loss_before: float | None
    eval_loss_after: float | None
    train_seconds: float
    # Non-padding tokens of the batches trained on, per second of training, summed over
    # all processes.
    tokens_per_second: float
    peak_memory_mb: float
    device: str
    precision: str
    # Non-padding tokens of the batches trained on, summed over all processes.
    trained_tokens: int = 0
    # Processes training together (more than one under `accelerate launch`). Peak memory and
    # the dropped dialogues are this process's own.
    processes: int = 1
    is_main_process: bool = True
    log: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["adapter_dir"] = str(self.adapter_dir)
        data.pop("log")
        return data


class TokenisedDialogues(Dataset):
    """Training samples of a JSONL file in the training format, tokenised once."""

    def __init__(self, path: Path, tokenizer: Any, max_length: int) -> None:
        self.samples: list[Sample] = []
        self.dropped: Counter[str] = Counter()
        self.dialogues = 0
        for item in jsonl_items(path, self.dropped):
            conversations, reason = validate(item)
            if conversations is None:
                self.dropped[reason or "invalid"] += 1
                continue
            samples = build_samples(tokenizer, conversations, max_length)
            if not samples:
                self.dropped["no exchange fits max_input_length + max_output_length"] += 1
                continue
            self.dialogues += 1
            self.samples.extend(samples)
        if not self.samples:
            raise TrainingError(
                f"{str(path)!r} contains no dialogue that can be trained on; check its format."
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        sample = self.samples[index]
        return {"input_ids": sample.input_ids, "labels": sample.labels}


class PadCollator:
    """Right-pads a batch: pad id for inputs, -100 for labels, zeros in the attention mask."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(feature["input_ids"]) for feature in features)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.tensor(feature["input_ids"])
            labels[row, :length] = torch.tensor(feature["labels"])
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def resolve_base_model(model: str) -> Path:
    """Return the folder of the base model: the embedded default or a model folder."""
    from core.config import resolve_path
    from core.generation import embedded

    if model == "embedded":
        return embedded.ensure_embedded_model(resolve_path("var/models"))
    path = resolve_path(model)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"Base model {model!r} not found: the recipe's `model` must be 'embedded' or a "
            "Hugging Face model folder with config.json."
        )
    from training.chatglm3 import ConversionError, ensure_native_checkpoint, is_chatglm3_folder

    if is_chatglm3_folder(path):
        try:
            return ensure_native_checkpoint(path, resolve_path("var/models"))
        except ConversionError as exc:
            raise ConfigError(str(exc)) from exc
    return path


def pick_precision(setting: str) -> tuple[torch.dtype, dict[str, bool]]:
    """Return the dtype to load the base in and the Trainer's mixed-precision flags."""
    cuda = torch.cuda.is_available()
    if setting == "auto":
        if not cuda:
            return torch.float32, {}
        setting = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if setting == "float32":
        return torch.float32, {}
    # NOTE: the test suite runs on CPU only, so the half-precision branches are checked by the
    # refusal below and not by a training run.
    if not cuda:
        raise ConfigError(
            f"precision {setting} needs a CUDA device, and none is available; use "
            "`precision: auto` or `float32`."
        )
    if setting == "bfloat16":
        if not torch.cuda.is_bf16_supported():
            raise ConfigError("This GPU does not support bfloat16; use `precision: float16`.")
        return torch.bfloat16, {"bf16": True}
    # float16 weights cannot be trained directly, so the base stays float32 under fp16 autocast.
    return torch.float32, {"fp16": True}


def data_manifest(recipe: Recipe) -> dict[str, Any]:
    """Name and hash the data files, with the dataset's own manifest when there is one."""
    files = {}
    for name in (recipe.train_file, recipe.val_file, recipe.test_file):
        path = recipe.path(name)
        if path is not None and path.is_file():
            files[name] = {"path": str(path), "sha256": file_sha256(path)}
    manifest: dict[str, Any] = {"files": files}
    built = recipe.data_dir / "manifest.json"
    if built.is_file():
        manifest["dataset"] = json.loads(built.read_text(encoding="utf-8"))
    return manifest


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Peak resident memory of this process; ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(
    recipe: Recipe, *, resume: str | bool | None = None, progress: bool = True
) -> TrainResult:
    """Train a LoRA adapter from ``recipe`` and return the run's figures.

    ``resume`` is a checkpoint folder, or True for the newest checkpoint in the output folder.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

    base_path = resolve_base_model(recipe.model)
    dtype, precision_flags = pick_precision(recipe.precision)
    tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
    if not tokenizer.chat_template:
        raise ConfigError(f"The tokenizer of {str(base_path)!r} has no chat template.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    train_path = recipe.path(recipe.train_file)
    assert train_path is not None
    if not train_path.is_file():
        raise ConfigError(
            f"Training file {str(train_path)!r} not found; build one with "
            "`mindharbor dataset build --out DIR` and pass `--data DIR`."
        )
    train_set = TokenisedDialogues(train_path, tokenizer, recipe.max_length)
    val_path = recipe.path(recipe.val_file)
    val_set = None
    if val_path is not None and val_path.is_file() and val_path.stat().st_size:
        val_set = TokenisedDialogues(val_path, tokenizer, recipe.max_length)
    else:
        logger.warning("No validation dialogues in %s: no evaluation loss is computed", val_path)
    logger.info(
        "Training on %d samples from %d dialogues (%d validation samples), max %d tokens",
        len(train_set),
        train_set.dialogues,
        len(val_set) if val_set else 0,
        recipe.max_length,
    )

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, local_files_only=True)
    if getattr(model.config, "quantization_config", None) is not None:
        logger.info("The base model is quantised; the adapter trains on top of it (QLoRA)")
    peft_config = dict(recipe.peft_config)
    if recipe.target_modules and getattr(model.config, "model_type", None) == "glm":
        from training.chatglm3 import native_target_modules

        peft_config["target_modules"] = native_target_modules(recipe.target_modules)
    model = get_peft_model(model, LoraConfig(**peft_config))
    lora_modules = sorted(
        name for name, module in model.named_modules() if hasattr(module, "lora_A")
    )

    args_values = dict(recipe.training_args)
    args_values.update(precision_flags)
    args_values.setdefault("disable_tqdm", not progress)
    if val_set is None:
        args_values["eval_strategy"] = "no"
    else:
        args_values.setdefault("eval_strategy", "steps")
        args_values.setdefault("eval_steps", args_values.get("save_steps", 100))
    if args_values.get("activation_checkpointing"):
        # Non-reentrant checkpointing works with frozen embeddings, which LoRA training has.
        args_values.setdefault("activation_checkpointing_kwargs", {"use_reentrant": False})
    # The Trainer's filter would hide a nan loss and train on, so it is off and the guard stops.
    args_values["logging_nan_inf_filter"] = False
    try:
        arguments = TrainingArguments(**args_values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"The recipe's training_args are not accepted: {exc}") from exc
    output_dir = Path(arguments.output_dir)
    logger.info(
        "Process %d of %d on %s",
        arguments.process_index + 1,
        arguments.world_size,
        arguments.device,
    )

    log: list[dict[str, Any]] = []

    class _LogFile(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            entry = {"step": state.global_step, **logs}
            log.append(entry)
            output_dir.mkdir(parents=True, exist_ok=True)
            with (output_dir / "log.jsonl").open("a", encoding="utf-8") as file:
                file.write(json.dumps(entry) + "\n")

    trainer = _GuardedTrainer(
        model=model,
        args=arguments,
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=PadCollator(int(tokenizer.pad_token_id)),
        callbacks=[_LogFile()],
    )

    if resume:
        resume = _checkpoint_to_resume(output_dir, resume, arguments.max_steps)
    eval_before = None
    if val_set is not None and not resume:
        eval_before = trainer.evaluate()["eval_loss"]
    started = time.perf_counter()
    outcome = trainer.train(resume_from_checkpoint=resume or None)
    train_seconds = time.perf_counter() - started
    trained_tokens = trainer.tokens_seen
    if arguments.world_size > 1:
        # A collective call: every process reaches it after train().
        total = torch.tensor(trained_tokens, device=arguments.device)
        trained_tokens = int(trainer.accelerator.reduce(total, reduction="sum").item())
    eval_after = trainer.evaluate()["eval_loss"] if val_set is not None else None

    adapter_dir = output_dir / ADAPTER_DIR
    result = TrainResult(
        adapter_dir=adapter_dir,
        base_model=recipe.model,
        train_samples=len(train_set),
        validation_samples=len(val_set) if val_set else 0,
        dropped=dict(train_set.dropped),
        steps=trainer.state.global_step,
        train_loss=outcome.training_loss,
        eval_loss_before=eval_before,
        eval_loss_after=eval_after,
        train_seconds=round(train_seconds, 3),
        tokens_per_second=round(trained_tokens / train_seconds, 1) if train_seconds else 0.0,
        trained_tokens=trained_tokens,
        peak_memory_mb=round(peak_memory_mb(arguments.device), 1),
        device=str(arguments.device),
        precision=str(dtype).removeprefix("torch.")
        + (" + " + ", ".join(precision_flags) + " autocast" if precision_flags else ""),
        processes=arguments.world_size,
        is_main_process=trainer.is_world_process_zero(),
        log=log,
    )
    if result.is_main_process:
        trainer.save_model(str(adapter_dir))
        tokenizer.save_pretrained(adapter_dir)
        metadata = {
            "base_model": recipe.model,
            "base_path": str(base_path),
            "recipe": recipe.raw,
            "training_args": {key: _jsonable(value) for key, value in args_values.items()},
            "data": data_manifest(recipe),
            "metrics": result.to_json(),
            "lora_modules": lora_modules,
        }
        (adapter_dir / METADATA_FILE).write_text(
            json.dumps(metadata, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        verify_adapter(adapter_dir, base_path, lora_modules, sample=(val_set or train_set)[0])
        (output_dir / RESULT_FILE).write_text(
            json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8"
        )
    _leave_process_group(trainer)
    return result


def _leave_process_group(trainer: Trainer) -> None:
    """Under a multi-process launch, wait for the main process and close the process group.

    A worker that exits while the group is still open can abort in the communication
    backend's threads ("terminate called without an active exception"), and the launcher
    then reports the whole run as failed.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    trainer.accelerator.wait_for_everyone()
    dist.destroy_process_group()


class _GuardedTrainer(Trainer):
    """A Trainer that stops on a non-finite loss and counts the tokens it trained on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokens_seen = 0

    def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().compute_loss(model, inputs, *args, **kwargs)
        if model.training:
            loss = result[0] if isinstance(result, tuple) else result
            # One device-to-host copy per step for both figures.
            loss_value, tokens = torch.stack(
                [loss.detach().float(), inputs["attention_mask"].sum().float()]
            ).tolist()
            self.tokens_seen += int(tokens)
            if not math.isfinite(loss_value):
                raise NonFiniteLoss(self.state.global_step + 1, loss_value)
        return result


def _checkpoint_to_resume(output_dir: Path, resume: str | bool, max_steps: int) -> str:
    """Return the checkpoint folder to resume from; raise TrainingError if none is usable."""
    from transformers.trainer_utils import get_last_checkpoint

    checkpoint = get_last_checkpoint(str(output_dir)) if resume is True else str(resume)
    if checkpoint is None or not (Path(checkpoint) / "trainer_state.json").is_file():
        raise TrainingError(
            f"No checkpoint to resume from in {str(checkpoint or output_dir)!r}; "
            "train without --resume, or name a checkpoint-N folder."
        )
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    step = int(state.get("global_step", 0))
    if max_steps > 0 and step >= max_steps:
        raise TrainingError(
            f"{checkpoint!r} is already at step {step} of max_steps {max_steps}; "
            "raise --max-steps to train further."
        )
    return checkpoint


def verify_adapter(
    adapter_dir: Path, base_path: Path, lora_modules: list[str], *, sample: dict[str, Any]
) -> None:
    """Check that the saved adapter has LoRA A and B weights for every adapted module and
    changes the model's output.

    Raises TrainingError naming what is missing.
    """
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    weights_file = adapter_dir / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise TrainingError(f"The adapter {str(adapter_dir)!r} has no adapter_model.safetensors.")
    with safe_open(str(weights_file), framework="pt") as file:
        keys = set(file.keys())
    missing = []
    for name in lora_modules:
        # Saved names drop peft's "base_model.model." prefix and the adapter name.
        short = name.removeprefix("base_model.model.")
        for part in ("lora_A", "lora_B"):
            if not any(key.endswith(f"{short}.{part}.weight") for key in keys):
                missing.append(f"{short}.{part}")
    if not lora_modules or missing:
        raise TrainingError(
            f"The adapter {str(adapter_dir)!r} is missing LoRA weights for "
            f"{', '.join(missing[:5]) or 'every target module'}"
            f"{' and more' if len(missing) > 5 else ''}."
        )

    input_ids = torch.tensor([sample["input_ids"][:64]])
    base = AutoModelForCausalLM.from_pretrained(
        base_path, dtype=torch.float32, local_files_only=True
    )
    base.eval()
    with torch.inference_mode():
        before = base(input_ids=input_ids).logits
        adapted = PeftModel.from_pretrained(base, adapter_dir)
        adapted.eval()
        after = adapted(input_ids=input_ids).logits
    change = (after - before).abs().max().item()
    if not change > 0:
        raise TrainingError(
            f"Loading the adapter {str(adapter_dir)!r} leaves the model's output unchanged; "
            "training did not move the LoRA weights (check learning_rate and max_steps)."
        )
    logger.info(
        "Adapter check passed: %d adapted modules, largest logit change %.4g",
        len(lora_modules),
        change,
    )


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
    except TypeError:
        return str(value)
    return value


def print_summary(result: TrainResult, out: Any = None) -> None:
    out = out or sys.stdout

    def loss(value: float | None) -> str:
        return f"{value:.4f}" if value is not None else "-"

    processes = f" in {result.processes} processes" if result.processes > 1 else ""
    memory_of = " (process 1)" if result.processes > 1 else ""
    print(
        f"Trained {result.steps} steps on {result.train_samples} samples in "
        f"{result.train_seconds:.0f} s ({result.trained_tokens} tokens{processes}, "
        f"{result.tokens_per_second:.0f} tokens/s, peak memory{memory_of} "
        f"{result.peak_memory_mb:.0f} MiB, {result.device}, {result.precision})",
        file=out,
    )
    if result.eval_loss_before is not None:
        validation = f"{loss(result.eval_loss_before)} -> {loss(result.eval_loss_after)}"
    else:
        # A resumed run does not measure the loss before its first step.
        validation = loss(result.eval_loss_after)
    print(f"  training loss {loss(result.train_loss)}; validation loss {validation}", file=out)
    if result.dropped:
        dropped = ", ".join(f"{reason}: {count}" for reason, count in result.dropped.items())
        print(f"  dialogues left out: {dropped}", file=out)
    print(f"  adapter: {result.adapter_dir}", file=out)
