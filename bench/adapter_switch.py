"""Benchmark: how long the local generator pauses to switch its LoRA adapter, idle and under load.

With `generator.local.adapter: promoted`, a newly promoted adapter is loaded between batches while
the model lock is held, so requests that arrive during the switch wait for it. This measures:

1. the switch time with no request running (median and max of several switches);
2. reply latency for a few concurrent users, first with no switch, then with a switch every
   `--switch-every` seconds, so the added wait shows in the p95 and max latency.

Runs on the embedded default model (SmolLM2-135M-Instruct) with two random-weight LoRA adapters
on every linear layer, or on the tiny test model. Prints figures, asserts nothing.

    python bench/adapter_switch.py [--model embedded|tiny] [--users 4] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from core.config import GeneratorSettings, LocalGeneratorSettings, resolve_path
from core.generation import embedded
from core.generation.base import ChatMessage, SamplingParams
from core.generation.local import LocalGenerator
from tests.helpers.tiny_model import build_tiny_chat_model

SYSTEM = ChatMessage("system", "You are a supportive listener. Reply in two or three sentences.")
MESSAGES = [
    "I could not sleep again last night.",
    "My exams start next week and I feel like I have not studied enough.",
    "I had an argument with my sister.",
    "Everything feels heavy today.",
]
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(base: Path, folder: Path, seed: int, rank: int) -> Path:
    """Save a LoRA adapter with random A and B weights (not the usual zero B) for ``base``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=TARGET_MODULES, init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (
        f"n={len(values):3d}  p50 {statistics.median(values):6.3f} s  "
        f"p95 {p95:6.3f} s  max {max(values):6.3f} s"
    )


async def reply_latencies(
    generator: LocalGenerator,
    users: int,
    seconds: float,
    params: SamplingParams,
    adapters: list[Path] | None,
    switch_every: float,
) -> tuple[list[float], list[float]]:
    """Run ``users`` users for ``seconds``; switch adapters every ``switch_every`` s if given."""
    latencies: list[float] = []
    switches: list[float] = []
    deadline = time.perf_counter() + seconds

    async def user(index: int) -> None:
        turn = 0
        while time.perf_counter() < deadline:
            text = MESSAGES[(index + turn) % len(MESSAGES)]
            started = time.perf_counter()
            await generator.generate([SYSTEM, ChatMessage("user", text)], params)
            latencies.append(time.perf_counter() - started)
            turn += 1

    async def switcher() -> None:
        assert adapters is not None
        count = 0
        while True:
            await asyncio.sleep(switch_every)
            if time.perf_counter() >= deadline:
                return
            started = time.perf_counter()
            count += 1
            await generator.switch_adapter(adapters[count % 2], label=f"adapter-{count % 2}")
            switches.append(time.perf_counter() - started)

    tasks = [user(index) for index in range(users)]
    if adapters is not None:
        tasks.append(switcher())
    await asyncio.gather(*tasks)
    return latencies, switches


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("embedded", "tiny"), default="embedded")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of both adapters")
    parser.add_argument("--idle-switches", type=int, default=6)
    parser.add_argument("--users", type=int, default=4, help="concurrent users under load")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each load phase")
    parser.add_argument("--switch-every", type=float, default=2.0)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    defaults = LocalGeneratorSettings()
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    print(
        f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    )

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if args.model == "embedded":
            base = embedded.ensure_embedded_model(resolve_path(defaults.models_dir))
        else:
            base = build_tiny_chat_model(work / "tiny-chat")
        adapters = [
            write_adapter(base, work / f"adapter-{index}", seed=index, rank=args.rank)
            for index in range(2)
        ]
        generator = LocalGenerator(
            model=base,
            adapter=adapters[0],
            device="cpu",
            max_batch_size=defaults.max_batch_size,
            batch_wait_ms=defaults.batch_wait_ms,
            stop_markers=GeneratorSettings().stop_markers,
        )
        async with generator:
            await generator.generate([SYSTEM, ChatMessage("user", MESSAGES[0])], params)
            print(
                f"model: {base.name} ({args.model}), LoRA rank {args.rank} on "
                f"{len(TARGET_MODULES)} module kinds, max_new_tokens={args.max_new_tokens}"
            )

            idle = []
            for index in range(1, args.idle_switches + 1):
                started = time.perf_counter()
                await generator.switch_adapter(adapters[index % 2], label=f"adapter-{index % 2}")
                idle.append(time.perf_counter() - started)
            print(f"switch, idle:            {summary(idle)}")

            steady, _ = await reply_latencies(
                generator, args.users, args.seconds, params, None, args.switch_every
            )
            print(f"replies, no switch:      {summary(steady)}")
            switched, switches = await reply_latencies(
                generator, args.users, args.seconds, params, adapters, args.switch_every
            )
            print(f"replies, with switches:  {summary(switched)}")
            if switches:
                # Includes the wait for the batch in flight before the lock is free.
                print(f"switch, under load:      {summary(switches)}")


if __name__ == "__main__":
    asyncio.run(main())
