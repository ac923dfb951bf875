"""Benchmark: tokens per second and peak memory of `mindharbor train` against a plain Trainer loop.

Both sides train the same LoRA adapter on the same base model in float32, with the LoraConfig
and TrainingArguments of config/lora.yaml (evaluation and checkpoints off), on the same tokenised
samples. MindHarbor's side calls `training.train.train`, and the plain side is peft's
`get_peft_model` and a stock transformers `Trainer`. Each measurement runs in its own subprocess,
so its peak memory is its own. Each round runs both sides, and the side that runs first
alternates from round to round, so that background load and any order effect hit both alike.

Tokens per second counts the non-padding tokens of the batches trained on, per second of
`Trainer.train()`. Peak memory is the peak resident set size of the subprocess up to the end of
training (model loading and tokenising included), or the peak CUDA memory allocated on a GPU.
Targets: MindHarbor's median throughput at least 0.95x the plain loop's, and its peak memory no
higher. Prints figures, asserts nothing.

On a CPU shared with other busy processes, torch's default of one thread per core makes the
step times swing widely, and `--threads 1` gives steadier figures.

    python bench/training/throughput.py [--model embedded|tiny] [--rounds 3] [--steps 10]
        [--batch-size 4] [--max-length 256] [--dialogues 40] [--data FILE] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import Trainer  # noqa: E402

from tests.helpers.tiny_model import build_tiny_chat_model  # noqa: E402
from training.recipe import load_recipe  # noqa: E402
from training.train import (  # noqa: E402
    PadCollator,
    TokenisedDialogues,
    resolve_base_model,
    train,
)

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "counselling_en.jsonl"
BASE_RECIPE = ROOT / "config" / "lora.yaml"
SIDES = ("mindharbor", "plain")
# The recipe's max_output_length: tokens of a sample reserved for the reply. The rest of
# --max-length is max_input_length, for the dialogue history.
OUTPUT_TOKENS = 64
TARGET_RATIO = 0.95


class CountingTrainer(Trainer):
    """A stock Trainer that also sums the attention masks of the batches it trains on.

    The sum is taken here rather than in the collator, because the data loader collates one
    batch ahead of the one being trained on. It stays a tensor, so counting adds no
    device-to-host copy per step.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokens_seen: torch.Tensor | None = None

    def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        tokens = inputs["attention_mask"].sum()
        self.tokens_seen = tokens if self.tokens_seen is None else self.tokens_seen + tokens
        return super().training_step(model, inputs, *args, **kwargs)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_mindharbor(recipe_path: Path, output_dir: Path) -> dict[str, Any]:
    recipe = load_recipe(recipe_path, output_dir=output_dir)
    result = train(recipe, progress=False)
    return {
        "side": "mindharbor",
        "tokens_per_second": result.tokens_per_second,
        "train_seconds": result.train_seconds,
        "tokens": result.trained_tokens,
        # Taken right after Trainer.train(), before the adapter is saved and checked, the same
        # point as on the plain side.
        "peak_memory_mib": result.peak_memory_mb,
        "samples": result.train_samples,
        "steps": result.steps,
        "train_loss": result.train_loss,
        "device": result.device,
    }


def measure_plain(recipe_path: Path, output_dir: Path) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    recipe = load_recipe(recipe_path, output_dir=output_dir)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_path = recipe.path(recipe.train_file)
    assert train_path is not None
    train_set = TokenisedDialogues(train_path, tokenizer, recipe.max_length)

    model = AutoModelForCausalLM.from_pretrained(
        recipe.model, dtype=torch.float32, local_files_only=True
    )
    model = get_peft_model(model, LoraConfig(**recipe.peft_config))
    arguments = TrainingArguments(**{**recipe.training_args, "disable_tqdm": True})
    trainer = CountingTrainer(
        model=model,
        args=arguments,
        train_dataset=train_set,
        data_collator=PadCollator(int(tokenizer.pad_token_id)),
    )

    started = time.perf_counter()
    outcome = trainer.train()
    train_seconds = time.perf_counter() - started

    tokens = int(trainer.tokens_seen) if trainer.tokens_seen is not None else 0
    return {
        "side": "plain",
        "tokens_per_second": round(tokens / train_seconds, 1),
        "train_seconds": round(train_seconds, 3),
        "tokens": tokens,
        "peak_memory_mib": round(peak_memory_mib(arguments.device), 1),
        "samples": len(train_set),
        "steps": trainer.state.global_step,
        "train_loss": outcome.training_loss,
        "device": str(arguments.device),
    }


def write_dataset(source: Path, folder: Path, dialogues: int) -> int:
    """Copy the first ``dialogues`` non-empty lines of ``source`` to folder/train.jsonl."""
    if not source.is_file():
        raise SystemExit(
            f"Data file {str(source)!r} not found. Pass --data FILE with JSONL dialogues in the "
            "training format."
        )
    folder.mkdir(parents=True)
    written = 0
    with (
        source.open(encoding="utf-8") as lines,
        (folder / "train.jsonl").open("w", encoding="utf-8") as out,
    ):
        for line in lines:
            if written == dialogues:
                break
            if line.strip():
                out.write(line if line.endswith("\n") else line + "\n")
                written += 1
    return written


def write_recipe(folder: Path, model_path: Path, data_dir: Path, args: argparse.Namespace) -> Path:
    """Write the benchmark's recipe to folder/recipe.yaml and return its path.

    It is config/lora.yaml with the benchmark's model, data and sizes, and with evaluation and
    checkpoint saving off.
    """
    raw = yaml.safe_load(BASE_RECIPE.read_text(encoding="utf-8"))
    raw["model"] = str(model_path)
    raw["data_config"] = {
        "data_dir": str(data_dir),
        "train_file": "train.jsonl",
        "val_file": None,
        "test_file": None,
    }
    raw["max_input_length"] = args.max_length - OUTPUT_TOKENS
    raw["max_output_length"] = OUTPUT_TOKENS
    # "auto" would pick bfloat16 or float16 on a GPU, and the plain side loads float32.
    raw["precision"] = "float32"
    raw["training_args"].update(
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        eval_strategy="no",
        save_strategy="no",
    )
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def run_side(side: str, recipe_path: Path, output_dir: Path, threads: int) -> dict[str, Any]:
    """Measure one side in a fresh Python process and return the JSON line it prints last."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--side",
        side,
        "--recipe",
        str(recipe_path),
        "--output-dir",
        str(output_dir),
        "--threads",
        str(threads),
    ]
    # The Trainer prints its log lines to stdout too, so only the last line is the result.
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr[-6000:])
        raise SystemExit(
            f"The {side} run failed with exit status {completed.returncode}. "
            "Its error output is above."
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def describe_machine(threads: int) -> str:
    if torch.cuda.is_available():
        device = f"CUDA device {torch.cuda.get_device_name(0)}"
    else:
        device = "CPU, no CUDA device"
    return (
        f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__} with "
        f"{threads or torch.get_num_threads()} threads per measurement, device: {device}"
    )


def print_summary(results: dict[str, list[dict[str, Any]]], rounds: int) -> None:
    medians = {
        side: statistics.median(run["tokens_per_second"] for run in runs)
        for side, runs in results.items()
    }
    peaks = {side: max(run["peak_memory_mib"] for run in runs) for side, runs in results.items()}
    # Peak RSS of one configuration varies by about 100 MiB from run to run on a CPU, so the
    # target compares medians, and the maximum is shown beside them.
    typical = {
        side: statistics.median(run["peak_memory_mib"] for run in runs)
        for side, runs in results.items()
    }

    header = f"tokens/s (median of {rounds})"
    print(f"\n{'side':<11} {header:>24} {'peak MiB (median)':>18} {'(max)':>7}")
    for side in SIDES:
        print(f"{side:<11} {medians[side]:>24.1f} {typical[side]:>18.0f} {peaks[side]:>7.0f}")

    ratio = medians["mindharbor"] / medians["plain"]
    verdict = "met" if ratio >= TARGET_RATIO else "missed"
    print(
        f"throughput ratio mindharbor/plain: {ratio:.2f} (target >= {TARGET_RATIO:.2f}, {verdict})"
    )
    difference = typical["mindharbor"] - typical["plain"]
    verdict = "met" if difference <= 0 else "missed"
    print(f"median peak memory mindharbor - plain: {difference:+.1f} MiB (target <= 0, {verdict})")


def run_benchmark(args: argparse.Namespace) -> None:
    print(describe_machine(args.threads))
    with tempfile.TemporaryDirectory(prefix="mindharbor-bench-") as temp:
        folder = Path(temp)
        if args.model == "tiny":
            model_path = build_tiny_chat_model(folder / "tiny-chat")
            model_label = "tiny random-weight model"
        else:
            model_path = resolve_base_model("embedded")
            model_label = f"embedded model ({model_path.name})"
        dialogues = write_dataset(args.data, folder / "data", args.dialogues)
        recipe_path = write_recipe(folder, model_path, folder / "data", args)
        print(
            f"model: {model_label}, float32; data: {dialogues} dialogues from {args.data.name}; "
            f"{args.steps} steps of batch size {args.batch_size}, max length {args.max_length} "
            f"tokens; {args.rounds} rounds"
        )

        results: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
        for round_number in range(1, args.rounds + 1):
            order = SIDES if round_number % 2 else SIDES[::-1]
            for side in order:
                run = run_side(side, recipe_path, folder / f"{side}-{round_number}", args.threads)
                results[side].append(run)
                loss = run["train_loss"]
                print(
                    f"round {round_number} {side:<10} {run['tokens_per_second']:>8.1f} tokens/s, "
                    f"{run['tokens']} tokens in {run['train_seconds']:.1f} s, "
                    f"{run['steps']} steps on {run['samples']} samples, "
                    f"peak {run['peak_memory_mib']:.0f} MiB, "
                    f"train loss {loss:.4f}" + (f", {run['device']}" if round_number == 1 else ""),
                    flush=True,
                )
    print_summary(results, args.rounds)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        choices=("embedded", "tiny"),
        default="embedded",
        help="base model: the embedded SmolLM2-135M, or a tiny random-weight model (quick check)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="JSONL dialogues in the training format (default: %(default)s)",
    )
    parser.add_argument(
        "--dialogues", type=int, default=40, help="dialogues taken from the start of --data"
    )
    parser.add_argument("--rounds", type=int, default=3, help="measurements per side")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per measurement")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per step")
    parser.add_argument(
        "--max-length",
        type=int,
        default=256,
        help=f"max tokens per sample, of which {OUTPUT_TOKENS} are reserved for the reply",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads per measurement (default 0: torch's own default)",
    )
    parser.add_argument(
        "--side",
        choices=SIDES,
        help="internal: measure one side in this process and print the result as a JSON line",
    )
    parser.add_argument("--recipe", type=Path, help="internal: the recipe written for --side")
    parser.add_argument("--output-dir", type=Path, help="internal: the Trainer's output folder")
    args = parser.parse_args()

    if args.side and (args.recipe is None or args.output_dir is None):
        parser.error("--side needs --recipe and --output-dir")
    for name in ("dialogues", "rounds", "steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads < 0:
        parser.error("--threads must be 0 or more")
    if args.max_length <= OUTPUT_TOKENS:
        parser.error(f"--max-length must be more than {OUTPUT_TOKENS}")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.side == "mindharbor":
        print(json.dumps(measure_mindharbor(args.recipe, args.output_dir)))
    elif args.side == "plain":
        print(json.dumps(measure_plain(args.recipe, args.output_dir)))
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
