"""Benchmark: replies per second of the local generator for 1, 4 and 16 concurrent users.

Each simulated user sends its next message as soon as its previous reply arrives, so the
micro-batcher receives up to that many requests at once. Every reply is greedy with a fixed
max_new_tokens. Runs on the tiny random-weight test model and on the embedded default model
(SmolLM2-135M-Instruct), and prints the ratio of 16 users to 1 user. Target: 16 concurrent users
get at least 4x the replies per second of one user at a time. Prints figures, asserts nothing.

    python bench/generation.py [--rounds 4] [--max-new-tokens 32] [--device auto] [--skip-embedded]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from core.config import GeneratorSettings, LocalGeneratorSettings, resolve_path
from core.generation.base import ChatMessage, SamplingParams
from core.generation.local import LocalGenerator
from tests.helpers.tiny_model import build_tiny_chat_model

CONCURRENCY = (1, 4, 16)
SYSTEM = ChatMessage("system", "You are a supportive listener. Reply in two or three sentences.")
# Messages of different lengths, so batches are left-padded as in real use.
MESSAGES = [
    "I could not sleep again last night.",
    "My exams start next week and I feel like I have not studied enough.",
    "Work has been stressful, my manager keeps adding deadlines and I stay up late to catch up.",
    "I had an argument with my sister.",
    "How do I tell my friends that I need some time alone without hurting them?",
    "Everything feels heavy today.",
    "I moved to a new city and I do not know anyone here yet.",
    "Thank you for listening yesterday, it helped a little.",
]


async def measure(
    generator: LocalGenerator, users: int, rounds: int, params: SamplingParams
) -> tuple[float, float]:
    """Return replies per second and the mean batch size for ``users`` concurrent users."""

    async def user(index: int) -> None:
        for round_index in range(rounds):
            text = MESSAGES[(index + round_index) % len(MESSAGES)]
            await generator.generate([SYSTEM, ChatMessage("user", text)], params)

    batches_before = generator.stats.batches
    requests_before = generator.stats.requests
    started = time.perf_counter()
    await asyncio.gather(*(user(index) for index in range(users)))
    elapsed = time.perf_counter() - started

    batches = generator.stats.batches - batches_before
    requests = generator.stats.requests - requests_before
    return users * rounds / elapsed, requests / max(batches, 1)


async def run_model(
    label: str, generator: LocalGenerator, rounds: int, params: SamplingParams
) -> None:
    async with generator:
        # The first call pays for one-time set-up (kernel selection, caches).
        await generator.generate([SYSTEM, ChatMessage("user", MESSAGES[0])], params)

        print(
            f"\n{label}: {generator.model_name} on {generator.device}, "
            f"max_new_tokens={params.max_new_tokens}, {rounds} replies per user"
        )
        print(f"{'users':>6} {'replies/s':>10} {'mean batch':>11}")
        rates = {}
        for users in CONCURRENCY:
            rate, mean_batch = await measure(generator, users, rounds, params)
            rates[users] = rate
            print(f"{users:>6} {rate:>10.2f} {mean_batch:>11.1f}")
        print(f"ratio 16 users / 1 user: {rates[16] / rates[1]:.1f}x (target >= 4x)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=4, help="replies per user for each concurrency"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per reply")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--skip-embedded", action="store_true", help="measure the tiny model only")
    args = parser.parse_args()

    defaults = LocalGeneratorSettings()
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    options = {
        "device": args.device,
        "max_batch_size": defaults.max_batch_size,
        "batch_wait_ms": defaults.batch_wait_ms,
        "stop_markers": GeneratorSettings().stop_markers,
    }

    if torch.cuda.is_available():
        cuda = f"CUDA device {torch.cuda.get_device_name(0)}"
    else:
        cuda = "no CUDA device"
    print(
        f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, {cuda}"
    )
    print(
        f"batching: max_batch_size={options['max_batch_size']}, "
        f"batch_wait_ms={options['batch_wait_ms']}"
    )

    with tempfile.TemporaryDirectory() as folder:
        tiny = build_tiny_chat_model(Path(folder) / "tiny-chat")
        await run_model(
            "tiny random model", LocalGenerator(model=tiny, **options), args.rounds, params
        )

    if not args.skip_embedded:
        embedded = LocalGenerator(
            model="embedded", models_dir=resolve_path(defaults.models_dir), **options
        )
        await run_model("embedded default model", embedded, args.rounds, params)


if __name__ == "__main__":
    asyncio.run(main())
