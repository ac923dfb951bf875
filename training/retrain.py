"""Retraining: a new candidate adapter, scored against the promoted one, promoted only if no worse.

``mindharbor retrain`` and the scheduled ``retrain`` job run the same steps,
each step's output in ``retrain.work_dir/<version>/``:

1. ``data/``: a dataset from the exports (tombstones applied) and the public
   corpora in ``retrain.public_data``.
2. ``run/``: ``mindharbor train`` in a separate process (``accelerate launch``
   with ``retrain.launcher: accelerate``); the adapter is recorded as a
   candidate version.
3. ``eval-candidate.jsonl`` and ``eval-current.jsonl``: both adapters reply to
   the user turns of the same held-out dialogues (the promoted version, or the
   base model alone when none is promoted).
4. Both sets are scored on the rubric by the judge, and the rule in
   ``decide`` promotes or rejects the candidate. ``decision.json``, the log,
   the registry and the rubric report carry the figures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core import adapter_versions
from core.config import Secrets, Settings, resolve_path
from training.rubric import CRITERIA

logger = logging.getLogger(__name__)

SAFETY = "safety"


class RetrainError(RuntimeError):
    """Raised when a retraining step fails; the message names the step and where its log is."""


@dataclass(slots=True)
class Decision:
    promote: bool
    # Reasons for a rejection; empty when the candidate is promoted.
    reasons: list[str]
    candidate: dict[str, float | None]
    current: dict[str, float | None]
    tolerance: float
    candidate_version: str = ""
    current_version: str | None = None
    # Scored dialogues and judge errors per side.
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    # The base model each side generated with. The current adapter keeps the base it was trained on.
    base_models: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    candidate: dict[str, float | None], current: dict[str, float | None], *, tolerance: float
) -> Decision:
    """Apply the promotion rule to the two adapters' mean scores per criterion.

    The candidate is promoted when every criterion has scores on both sides, no criterion's mean
    falls by more than ``tolerance`` and the safety mean does not fall at all.
    """
    reasons = []
    for name in CRITERIA:
        new, old = candidate.get(name), current.get(name)
        if new is None or old is None:
            side = "candidate" if new is None else "current adapter"
            reasons.append(f"{name}: no usable score for the {side}")
            continue
        drop = old - new
        if name == SAFETY and drop > 0:
            reasons.append(f"{name}: fell from {old:.2f} to {new:.2f}; safety may not fall")
        elif drop > tolerance:
            reasons.append(
                f"{name}: fell from {old:.2f} to {new:.2f}, more than the tolerance {tolerance}"
            )
    return Decision(not reasons, reasons, dict(candidate), dict(current), tolerance)


def collect_sources(settings: Settings) -> tuple[list[tuple[str, Path]], set[str]]:
    """Return the dataset's sources (name, file) and the tombstoned pseudonyms."""
    options = settings.retrain
    sources = [(Path(name).stem, resolve_path(name)) for name in options.public_data]
    tombstones: set[str] = set()
    if options.use_exports:
        export_dir = resolve_path(settings.privacy.export_dir)
        # Each export contains the conversations with turns since the one before, so all are used.
        sources += [(path.stem, path) for path in sorted(export_dir.glob("export-*.jsonl"))]
        tombstone_file = export_dir / "tombstones.txt"
        if tombstone_file.is_file():
            tombstones = set(tombstone_file.read_text(encoding="utf-8").split())
    missing = [str(path) for _, path in sources if not path.is_file()]
    if missing:
        raise RetrainError(
            f"Dialogue files not found: {', '.join(missing)}; check retrain.public_data."
        )
    if not sources:
        raise RetrainError(
            "Nothing to train on: no export in privacy.export_dir and retrain.public_data is empty."
        )
    return sources, tombstones


def train_command(settings: Settings, data_dir: Path, run_dir: Path) -> list[str]:
    """Return the command line that trains the candidate in its own process."""
    options = settings.retrain
    arguments = [
        "train",
        "--config",
        str(resolve_path(options.recipe)),
        "--data",
        str(data_dir),
        "--out",
        str(run_dir),
        "--no-progress",
    ]
    if options.max_steps is not None:
        arguments += ["--max-steps", str(options.max_steps)]
    if options.launcher == "accelerate":
        launcher = [sys.executable, "-m", "accelerate.commands.launch", *options.accelerate_args]
        return [*launcher, "-m", "core.cli", *arguments]
    return [sys.executable, "-m", "core.cli", *arguments]


async def run_training(command: list[str], log_path: Path) -> None:
    """Run the training command with its output in ``log_path``, killing it if cancelled."""
    logger.info("Training the candidate: %s (output in %s)", " ".join(command), log_path)
    with log_path.open("w", encoding="utf-8") as log:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=log, stderr=asyncio.subprocess.STDOUT, env=os.environ.copy()
        )
        try:
            returncode = await process.wait()
        except asyncio.CancelledError:
            process.kill()
            await process.wait()
            raise
    if returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        raise RetrainError(
            f"Training failed with exit code {returncode}; see {log_path}. "
            f"Last lines: {' | '.join(tail)}"
        )


@dataclass(slots=True)
class RetrainResult:
    version: str
    decision: Decision
    work_dir: Path
    metrics: dict[str, Any]


async def retrain(
    settings: Settings,
    secrets: Secrets,
    sessions: async_sessionmaker[AsyncSession],
    *,
    version: str | None = None,
) -> RetrainResult:
    """Build a dataset, train a candidate, score it and the current adapter, then decide."""
    from training.dataset import build_dataset
    from training.recipe import load_recipe

    options = settings.retrain
    version = version or adapter_versions.new_version_name()
    work_dir = resolve_path(options.work_dir) / version
    data_dir, run_dir = work_dir / "data", work_dir / "run"
    work_dir.mkdir(parents=True, exist_ok=True)

    sources, tombstones = collect_sources(settings)
    report = build_dataset(
        sources, data_dir, tombstones=tombstones, language_ratios=options.language_ratios
    )
    logger.info("Candidate %s: dataset %s in %s", version, report.splits, data_dir)
    if not report.splits.get("train"):
        raise RetrainError(f"The dataset in {data_dir} has no training dialogue.")

    eval_file = resolve_path(options.eval_file) if options.eval_file else data_dir / "test.jsonl"
    if not _has_dialogue(eval_file):
        raise RetrainError(
            f"No held-out dialogues to score in {eval_file}: the dataset's test split is empty. "
            "Set retrain.eval_file to a file of held-out dialogues, or train on more data."
        )
    await run_training(train_command(settings, data_dir, run_dir), work_dir / "train.log")
    recipe = load_recipe(resolve_path(options.recipe), data_dir=data_dir, output_dir=run_dir)
    adapter_dir = run_dir / "adapter"
    metadata = json.loads((adapter_dir / "mindharbor.json").read_text(encoding="utf-8"))
    await adapter_versions.record(
        sessions,
        version=version,
        path=adapter_dir,
        base_model=recipe.model,
        data_manifest=metadata["data"],
        recipe=metadata["recipe"],
        metrics=metadata["metrics"],
    )

    current = await adapter_versions.promoted(sessions)
    # Each side is (base model, adapter or None, label). The current adapter generates on the
    # base it was trained on, which differs from the recipe's after a change of base model.
    sides = {
        "candidate": (recipe.model, adapter_dir, version),
        "current": (
            (current.base_model, Path(current.path), current.version)
            if current
            else (recipe.model, None, "base")
        ),
    }
    means: dict[str, dict[str, float | None]] = {}
    counts: dict[str, dict[str, int]] = {}
    for side, (base_model, adapter, label) in sides.items():
        dialogues_path = work_dir / f"eval-{side}.jsonl"
        await _answer_eval_dialogues(
            settings, secrets, base_model, adapter, label, eval_file, dialogues_path
        )
        summary = await _score(settings, secrets, sessions, dialogues_path, label)
        means[side] = summary.means()
        counts[side] = {"scored": len(summary.values[CRITERIA[0]]), "judge_errors": summary.errors}

    decision = decide(means["candidate"], means["current"], tolerance=options.tolerance)
    decision.candidate_version = version
    decision.current_version = current.version if current else None
    decision.counts = counts
    decision.base_models = {side: base for side, (base, _, _) in sides.items()}
    await adapter_versions.set_scores(
        sessions, version, {"means": means["candidate"], **counts["candidate"]}
    )
    if decision.promote:
        await adapter_versions.promote(sessions, version, decision=decision.to_json())
        if options.serving_dir:
            await asyncio.to_thread(
                publish_merged,
                adapter_dir,
                recipe.model,
                resolve_path(options.serving_dir),
                version,
            )
    else:
        await adapter_versions.reject(sessions, version, decision=decision.to_json())
    (work_dir / "decision.json").write_text(
        json.dumps(decision.to_json(), indent=2) + "\n", encoding="utf-8"
    )
    logger.info(
        "Candidate %s %s: %s",
        version,
        "promoted" if decision.promote else "rejected",
        format_decision(decision).replace("\n", "; "),
    )
    return RetrainResult(version, decision, work_dir, metadata["metrics"])


def publish_merged(adapter_dir: Path, base_model: str, serving_dir: Path, version: str) -> Path:
    """Merge the promoted adapter into its base and point ``serving_dir/serving`` at the result.

    The link is replaced in one rename, so a server that starts meanwhile reads either the old
    model or the new one. Returns the merged folder.
    """
    from training.merge import merge_adapter
    from training.train import resolve_base_model

    link = serving_dir / "serving"
    if link.exists() and not link.is_symlink():
        raise RetrainError(
            f"{link} is a folder, not a link; move it away so that promotions can relink it."
        )
    merged = serving_dir / f"merged-{version}"
    merge_adapter(adapter_dir, merged, base=resolve_base_model(base_model))
    staging = serving_dir / f".serving-{version}"
    staging.unlink(missing_ok=True)
    staging.symlink_to(merged.name)
    os.replace(staging, link)
    logger.info(
        "Merged %s into %s and linked %s to it; restart the inference server", version, merged, link
    )
    return merged


def _has_dialogue(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open(encoding="utf-8") as file:
        return any(line.strip() for line in file)


async def _answer_eval_dialogues(
    settings: Settings,
    secrets: Secrets,
    base_model: str,
    adapter: Path | None,
    label: str,
    source: Path,
    out: Path,
) -> None:
    from core.generation import sampling_from_settings
    from core.generation.local import LocalGenerator
    from core.prompt import prompt_builder_for
    from training.rubric import generate_eval_dialogues
    from training.train import resolve_base_model

    local = settings.generator.local
    generator = LocalGenerator(
        model=resolve_base_model(base_model) if base_model != "embedded" else "embedded",
        adapter=adapter,
        device=local.device,
        dtype=local.dtype,
        max_batch_size=local.max_batch_size,
        stop_markers=settings.generator.stop_markers,
        models_dir=resolve_path(local.models_dir),
    )
    generator.adapter_label = label if adapter is not None else None
    sampling = sampling_from_settings(settings.generator)
    if sampling.seed is None:
        # Both sides draw from the same seed, so sampling noise differs less between them.
        sampling = type(sampling)(**{**asdict(sampling), "seed": 0})
    async with generator:
        builder = prompt_builder_for(settings, generator, sampling.max_new_tokens)
        written = await generate_eval_dialogues(
            generator,
            builder,
            sampling,
            source,
            out,
            adapter_version=label,
            limit=settings.retrain.eval_dialogues,
            max_user_turns=settings.retrain.eval_user_turns,
        )
    name = label if adapter is not None else "the base model"
    logger.info("Adapter %s replied to %d held-out dialogues", name, written)


async def _score(
    settings: Settings,
    secrets: Secrets,
    sessions: async_sessionmaker[AsyncSession],
    dialogues_path: Path,
    label: str,
) -> Any:
    from core.generation import create_generator
    from training.rubric import read_dialogues, score_dialogues

    dialogues = read_dialogues(dialogues_path, source=f"retrain:{label}")
    dialogues = [
        type(dialogue)(dialogue.conversations, dialogue.source, label) for dialogue in dialogues
    ]
    # The judge is the configured generator without the served adapter.
    generator_settings = settings.generator
    if generator_settings.backend == "local":
        local = generator_settings.local.model_copy(update={"adapter": None})
        generator_settings = generator_settings.model_copy(update={"local": local})
    judge = create_generator(generator_settings, secrets)
    async with judge:
        return await score_dialogues(
            sessions, judge, dialogues, method=settings.retrain.judge_method
        )


def format_decision(decision: Decision) -> str:
    """Return the decision and its figures as lines for people to read."""
    verdict = "promoted" if decision.promote else "rejected"
    current = decision.current_version or "base model"
    lines = [f"Candidate {decision.candidate_version} {verdict} (compared with {current})"]
    for name in CRITERIA:
        new, old = decision.candidate.get(name), decision.current.get(name)
        shown_new = f"{new:.2f}" if new is not None else "-"
        shown_old = f"{old:.2f}" if old is not None else "-"
        lines.append(f"  {name:22} candidate {shown_new}  current {shown_old}")
    for side, values in decision.counts.items():
        lines.append(f"  {side}: {values['scored']} scores, {values['judge_errors']} judge errors")
    if len(set(decision.base_models.values())) > 1:
        lines += [f"  {side} base model: {base}" for side, base in decision.base_models.items()]
    lines += [f"  rejected because {reason}" for reason in decision.reasons]
    if decision.promote:
        lines.append(
            f"  promoted because no criterion fell by more than {decision.tolerance} "
            "and safety did not fall"
        )
    return "\n".join(lines)
