"""The ``mindharbor`` command: migrations, console chat and replay, and the service runner."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from core.config import CONFIG_DIR, Settings, load_secrets, load_settings
from core.errors import ConfigError, PlatformUnavailable
from core.logs import build_handler, secret_values
from core.storage import db

_LOGGER = logging.getLogger(__name__)

# Dependencies whose INFO lines would drown the service's own.
_NOISY_LOGGERS = ("httpx", "httpcore", "sqlalchemy.engine", "alembic", "asyncio", "urllib3")


def configure_logging(
    level: str, log_format: Literal["text", "json"] = "text", secrets: Iterable[str] = ()
) -> None:
    """Log to stderr in ``log_format``, replacing each value in ``secrets`` with [redacted].

    As with logging.basicConfig, a root logger that already has handlers is left alone.
    """
    logging.basicConfig(level=level, handlers=[build_handler(log_format, secrets, sys.stderr)])
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mindharbor", description="MindHarbor mental-health support chatbot service."
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="settings file (default: $MINDHARBOR_CONFIG or config/default.yaml)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    database = commands.add_parser("db", help="database migrations")
    database_commands = database.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = database_commands.add_parser("upgrade", help="apply migrations (default: to head)")
    upgrade.add_argument("revision", nargs="?", default="head")
    downgrade = database_commands.add_parser("downgrade", help="revert migrations to REVISION")
    downgrade.add_argument("revision", help="target revision, for example 'base' or '-1'")
    database_commands.add_parser("current", help="print the database's revision")

    chat = commands.add_parser("chat", help="chat in the terminal, or replay recorded dialogues")
    chat.add_argument(
        "--replay",
        type=Path,
        metavar="FILE.jsonl",
        help="play the user turns of each dialogue in FILE (training format), one user each",
    )
    chat.add_argument("--limit", type=int, help="replay at most this many dialogues")
    chat.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="dialogues replayed at the same time (default: 1)",
    )
    chat.add_argument("--lang", help="language hint for a new console user: en or zh")
    chat.add_argument(
        "--verbose", action="store_true", help="show the service's log lines while chatting"
    )

    commands.add_parser(
        "run",
        help="start every adapter whose credentials are set (with none, the console chat on "
        "a terminal)",
    )
    commands.add_parser(
        "export",
        help="write consented conversations since the last export, anonymised, to "
        "privacy.export_dir",
    )
    commands.add_parser(
        "purge", help="delete turns older than privacy.retention_days (counts are kept)"
    )
    commands.add_parser(
        "scheduler",
        help="run scheduled jobs (export, purge, score, retrain) until SIGINT or SIGTERM",
    )
    score = commands.add_parser(
        "score",
        help="rate dialogues on the four rubric criteria with the configured generator as judge",
    )
    source = score.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", type=Path, help="dialogues in the training format (JSONL)")
    source.add_argument(
        "--export",
        type=Path,
        metavar="DIR",
        help="the newest export in DIR (an export folder) that contains dialogues",
    )
    source.add_argument(
        "--pairs",
        type=Path,
        metavar="FILE",
        help="labelled dialogue pairs that check the judge (bench/eval/data/judge_pairs.jsonl)",
    )
    source.add_argument(
        "--database",
        type=int,
        metavar="N",
        help="a random sample of N conversations from the last 30 days (consented users)",
    )
    score.add_argument("--limit", type=int, help="score at most this many dialogues")
    score.add_argument(
        "--repeat", type=int, default=1, help="score each dialogue K times and report the spread"
    )
    score.add_argument("--force", action="store_true", help="score again instead of reusing")

    generate_eval = commands.add_parser(
        "generate-eval",
        help="play the user turns of held-out dialogues through the current generator and "
        "write the new dialogues, to score adapters on the same inputs",
    )
    generate_eval.add_argument("source", type=Path, help="dialogues in the training format")
    generate_eval.add_argument(
        "--out", type=Path, required=True, help="JSONL file to write (training format)"
    )
    generate_eval.add_argument("--limit", type=int, help="play at most this many dialogues")

    dataset = commands.add_parser("dataset", help="training datasets")
    dataset_commands = dataset.add_subparsers(
        dest="dataset_command", required=True, metavar="ACTION"
    )
    build = dataset_commands.add_parser(
        "build",
        help="combine exports and public corpora into train, validation and test files",
    )
    build.add_argument("--out", type=Path, required=True, help="folder to write")
    build.add_argument(
        "--source",
        type=Path,
        action="append",
        default=[],
        help="a JSONL file in the training format (repeatable; default: the public corpora in "
        "../shared/data)",
    )
    build.add_argument(
        "--exports", type=Path, help="an export folder: every export in it, with its tombstones"
    )
    build.add_argument(
        "--zh-ratio",
        type=float,
        help="share of Chinese dialogues after mixing, 0 to 1 (default: keep everything)",
    )
    build.add_argument("--seed", type=int, default=0, help="seed of the language mixing")

    train = commands.add_parser(
        "train", help="train a LoRA adapter on a dataset (see config/lora.yaml)"
    )
    train.add_argument(
        "--config",
        dest="recipe",
        type=Path,
        default=CONFIG_DIR / "lora.yaml",
        help="the training recipe (default: config/lora.yaml)",
    )
    train.add_argument("--data", type=Path, help="dataset folder (default: the recipe's data_dir)")
    train.add_argument("--out", type=Path, help="output folder (default: the recipe's output_dir)")
    train.add_argument("--model", help="base model: 'embedded' or a folder (default: the recipe's)")
    train.add_argument("--max-steps", type=int, help="override training_args.max_steps")
    train.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        help="continue from a checkpoint folder, or from the newest one in the output folder",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    merge = commands.add_parser(
        "merge", help="merge a LoRA adapter into its base model and write a plain model folder"
    )
    merge.add_argument("adapter", type=Path, help="the adapter folder")
    merge.add_argument("--out", type=Path, required=True, help="folder to write")
    merge.add_argument(
        "--base", help="base model folder or 'embedded' (default: the one the adapter names)"
    )

    commands.add_parser(
        "retrain",
        help="train a candidate adapter, score it against the promoted one and promote it "
        "only if no worse (see the retrain settings)",
    )
    adapters = commands.add_parser("adapters", help="trained adapter versions")
    adapter_commands = adapters.add_subparsers(
        dest="adapters_command", required=True, metavar="ACTION"
    )
    adapter_commands.add_parser("list", help="list every version with its status and scores")
    promote = adapter_commands.add_parser(
        "promote", help="serve VERSION from now on (for example to roll back)"
    )
    promote.add_argument("version")

    convert = commands.add_parser(
        "convert", help="convert ChatGLM3 checkpoints and adapters to transformers' native GLM"
    )
    convert_commands = convert.add_subparsers(
        dest="convert_command", required=True, metavar="ACTION"
    )
    checkpoint = convert_commands.add_parser(
        "chatglm3", help="a ChatGLM3 model folder (with tokenizer.model) to a GlmForCausalLM folder"
    )
    checkpoint.add_argument("src", type=Path, help="the ChatGLM3 folder")
    checkpoint.add_argument("dst", type=Path, help="the folder to write (must not exist)")
    adapter = convert_commands.add_parser(
        "chatglm3-adapter", help="a LoRA adapter trained on ChatGLM3 to one for its conversion"
    )
    adapter.add_argument("src", type=Path, help="the adapter folder")
    adapter.add_argument("dst", type=Path, help="the folder to write (must not exist)")
    adapter.add_argument(
        "--base",
        type=Path,
        required=True,
        help="the converted model folder (from convert chatglm3)",
    )

    report = commands.add_parser(
        "report", help="write the rubric report (HTML page and PNG plots) from stored scores"
    )
    report.add_argument(
        "--out", type=Path, default=Path("var/report"), help="folder to write (default var/report)"
    )

    discord_parser = commands.add_parser("discord", help="Discord administration")
    discord_commands = discord_parser.add_subparsers(
        dest="discord_command", required=True, metavar="ACTION"
    )
    sync = discord_commands.add_parser(
        "sync-commands", help="register the slash commands with Discord (needs DISCORD_BOT_TOKEN)"
    )
    sync.add_argument(
        "--guild",
        type=int,
        action="append",
        help="register in this guild only (repeatable); default: discord.command_guild_ids, "
        "or globally",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"mindharbor: {exc}", file=sys.stderr)
        return 2

    interactive_chat = args.command == "chat" and args.replay is None and not args.verbose
    # Log lines would break into the conversation on the terminal; --verbose shows them.
    configure_logging(
        "CRITICAL" if interactive_chat else settings.log_level,
        settings.log_format,
        secret_values(settings, load_secrets()),
    )

    try:
        if args.command == "db":
            return _database(args, settings)
        if args.command == "chat":
            return asyncio.run(_chat(args, settings))
        if args.command == "run":
            return asyncio.run(_run(settings))
        if args.command == "discord":
            return asyncio.run(_discord_sync(args, settings))
        if args.command == "export":
            return asyncio.run(_export(settings))
        if args.command == "purge":
            return asyncio.run(_purge(settings))
        if args.command == "scheduler":
            return asyncio.run(_scheduler(settings))
        if args.command == "score":
            return asyncio.run(_score(args, settings))
        if args.command == "generate-eval":
            return asyncio.run(_generate_eval(args, settings))
        if args.command == "report":
            return asyncio.run(_report(args, settings))
        if args.command == "dataset":
            return _dataset_build(args)
        if args.command == "retrain":
            return asyncio.run(_retrain(settings))
        if args.command == "adapters":
            return asyncio.run(_adapters(args, settings))
        if args.command == "convert":
            return _convert(args)
        if args.command == "train":
            return _train(args)
        if args.command == "merge":
            return _merge(args)
    except ConfigError as exc:
        print(f"mindharbor: {exc}", file=sys.stderr)
        return 2
    except PlatformUnavailable as exc:
        print(f"mindharbor: {exc}", file=sys.stderr)
        return 1
    except sa_exc.DBAPIError as exc:
        # A failed connection (missing database, server down, bad password) arrives as a plain
        # DBAPIError from asyncpg. Subclasses such as IntegrityError mean a bug, so they re-raise.
        connection_failure = (sa_exc.OperationalError, sa_exc.InterfaceError)
        if type(exc) is not sa_exc.DBAPIError and not isinstance(exc, connection_failure):
            raise
        url = make_url(db.resolve_database_url(settings.database.url))
        print(
            f"mindharbor: cannot use the database {url.render_as_string(hide_password=True)}: "
            f"{getattr(exc, 'orig', None) or exc}. Check database.url "
            "(MINDHARBOR_DATABASE__URL) and that the server is running; "
            "PostgreSQL databases are created with createdb.",
            file=sys.stderr,
        )
        _LOGGER.debug("Database error", exc_info=exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return 1


def _database(args: argparse.Namespace, settings: Settings) -> int:
    from alembic import command

    if args.db_command == "upgrade":
        db.upgrade(settings.database.url, args.revision)
    elif args.db_command == "downgrade":
        db.downgrade(settings.database.url, args.revision)
    else:
        command.current(db.alembic_config(settings.database.url), verbose=True)
    return 0


async def _chat(args: argparse.Namespace, settings: Settings) -> int:
    from bots import console
    from core.service import Service

    if args.replay is not None and not args.replay.is_file():
        print(f"mindharbor: replay file {str(args.replay)!r} not found", file=sys.stderr)
        return 2

    async with Service(settings, load_secrets()) as service:
        if args.replay is not None:
            report = await console.replay(
                service, args.replay, limit=args.limit, concurrency=args.concurrency
            )
            return 0 if report.user_turns and report.apologies == 0 else 1
        await console.run_until_terminated(
            console.run_interactive(service, locale_hint=args.lang or os.environ.get("LANG"))
        )
    return 0


async def _run(settings: Settings) -> int:
    from bots import console, runner
    from core import observability
    from core.service import Service

    secrets = load_secrets()
    if secrets.telegram_bot_token is None and secrets.discord_bot_token is None:
        if not sys.stdin.isatty():
            # In a container or under a service manager the console chat would end at once.
            print(
                "mindharbor: no platform credentials are set and there is no terminal for the "
                "console chat; set TELEGRAM_BOT_TOKEN or DISCORD_BOT_TOKEN",
                file=sys.stderr,
            )
            return 2
    async with Service(settings, secrets) as service:
        adapters = runner.configured_adapters(service, secrets)
        async with observability.serve_service(service, adapters):  # type: ignore[arg-type]
            if not adapters:
                _LOGGER.info("No platform credentials are set; starting the console chat")
                await console.run_until_terminated(
                    console.run_interactive(service, locale_hint=os.environ.get("LANG"))
                )
                return 0
            await runner.run_until_stopped(adapters, grace_s=settings.shutdown_grace_s)
    return 0


async def _export(settings: Settings) -> int:
    from core.jobs import run_export

    result = await run_export(settings, load_secrets())
    print(
        f"Exported {result.dialogues} dialogues ({result.turns} turns) to {result.path}; "
        f"manifest {result.manifest_path.name}"
    )
    return 0


async def _purge(settings: Settings) -> int:
    from core.jobs import purge_job

    deleted = await purge_job(settings)
    print(f"Deleted {deleted} turns older than {settings.privacy.retention_days} days")
    return 0


async def _score(args: argparse.Namespace, settings: Settings) -> int:
    from core.generation import create_generator
    from training import rubric

    if args.repeat < 1:
        print("mindharbor: --repeat must be at least 1", file=sys.stderr)
        return 2
    await db.upgrade_async(settings.database.url)
    engine = db.create_engine(settings.database)
    sessions = db.create_session_factory(engine)
    try:
        if args.database is not None:
            dialogues = await rubric.sample_database(sessions, args.database)
        elif args.pairs is not None:
            if not args.pairs.is_file():
                print(f"mindharbor: pairs file {str(args.pairs)!r} not found", file=sys.stderr)
                return 2
            dialogues = rubric.read_pairs(args.pairs)
        else:
            path = args.file
            if args.export is not None:
                exports = sorted(args.export.glob("export-*.jsonl"))
                # An export of a quiet week is empty, so the newest one with dialogues is scored.
                with_dialogues = [export for export in exports if export.stat().st_size > 0]
                if not with_dialogues:
                    state = "only empty exports" if exports else "no export"
                    print(f"mindharbor: {state} in {str(args.export)!r}", file=sys.stderr)
                    return 2
                path = with_dialogues[-1]
                print(f"Scoring {path.name}")
            if not path.is_file():
                print(f"mindharbor: dialogue file {str(path)!r} not found", file=sys.stderr)
                return 2
            source = "export" if args.export is not None else "file"
            dialogues = rubric.read_dialogues(path, source=source, limit=args.limit)
        if args.limit is not None:
            dialogues = dialogues[: args.limit]

        judge = create_generator(settings.generator, load_secrets())
        await judge.start()
        try:
            summary = await rubric.score_dialogues(
                sessions, judge, dialogues, repeat=args.repeat, force=args.force
            )
        finally:
            await judge.stop()
    finally:
        await engine.dispose()

    print(
        f"{len(dialogues)} dialogues: {summary.scored} scored, {summary.reused} reused, "
        f"{summary.errors} judge errors (left out of the means); judge {judge.model_name}, "
        f"prompt {rubric.PROMPT_VERSION}"
    )
    if args.pairs is not None:
        engine = db.create_engine(settings.database)
        try:
            async with db.create_session_factory(engine)() as session:
                from sqlalchemy import select

                from core.storage.models import RubricScore

                rows = list((await session.execute(select(RubricScore))).scalars())
        finally:
            await engine.dispose()
        for criterion, (right, total) in sorted(
            rubric.pair_agreement(rows).get(judge.model_name, {}).items()
        ):
            print(f"  pairs ranked right on {criterion}: {right} of {total}")
    for name, mean in summary.means().items():
        count = len(summary.values[name])
        shown = f"{mean:.2f}" if mean is not None else "-"
        spread = summary.spread.get(name)
        extra = f", spread across repeats {spread:.2f}" if spread is not None else ""
        print(f"  {name:22} mean {shown} (n={count}){extra}")
    return 0


async def _generate_eval(args: argparse.Namespace, settings: Settings) -> int:
    from core.generation import create_generator, sampling_from_settings
    from core.prompt import prompt_builder_for
    from training import rubric

    if not args.source.is_file():
        print(f"mindharbor: dialogue file {str(args.source)!r} not found", file=sys.stderr)
        return 2
    generator = create_generator(settings.generator, load_secrets())
    await generator.start()
    try:
        sampling = sampling_from_settings(settings.generator)
        builder = prompt_builder_for(settings, generator, sampling.max_new_tokens)
        local = settings.generator.local
        adapter = local.adapter if settings.generator.backend == "local" else None
        version = f"{generator.model_name}+{adapter}" if adapter else generator.model_name
        written = await rubric.generate_eval_dialogues(
            generator,
            builder,
            sampling,
            args.source,
            args.out,
            adapter_version=version,
            limit=args.limit,
        )
    finally:
        await generator.stop()
    print(f"Wrote {written} dialogues from {version} to {args.out}")
    return 0


def _dataset_build(args: argparse.Namespace) -> int:
    from core.config import PROJECT_ROOT
    from training.dataset import build_dataset

    sources: list[tuple[str, Path]] = [(path.stem, path) for path in args.source]
    if not sources:
        shared = PROJECT_ROOT.parent / "shared" / "data"
        sources = [(path.stem, path) for path in sorted(shared.glob("counselling_*.jsonl"))]
    tombstones: set[str] = set()
    if args.exports is not None:
        if not args.exports.is_dir():
            print(
                f"mindharbor: export folder {str(args.exports)!r} not found; run "
                "`mindharbor export` first or leave out --exports",
                file=sys.stderr,
            )
            return 2
        sources += [(path.stem, path) for path in sorted(args.exports.glob("export-*.jsonl"))]
        tombstone_file = args.exports / "tombstones.txt"
        if tombstone_file.is_file():
            tombstones = set(tombstone_file.read_text(encoding="utf-8").split())
    missing = [str(path) for _, path in sources if not path.is_file()]
    if missing or not sources:
        print(f"mindharbor: dialogue files not found: {missing or 'none given'}", file=sys.stderr)
        return 2
    ratios = None
    if args.zh_ratio is not None:
        if not 0 <= args.zh_ratio <= 1:
            print("mindharbor: --zh-ratio must be between 0 and 1", file=sys.stderr)
            return 2
        ratios = {"zh": args.zh_ratio, "en": 1 - args.zh_ratio}
    report = build_dataset(
        sources, args.out, tombstones=tombstones, language_ratios=ratios, seed=args.seed
    )
    counts = ", ".join(f"{name} {count}" for name, count in report.splits.items())
    print(f"Wrote {counts} to {args.out}")
    for reason, count in sorted(report.dropped.items()):
        if count:
            print(f"  dropped {count}: {reason}")
    for language, stats in sorted(report.stats.items()):
        print(
            f"  {language}: {stats['dialogues']} dialogues, {stats['turns']} turns, "
            f"about {stats['tokens']} tokens"
        )
    return 0


async def _report(args: argparse.Namespace, settings: Settings) -> int:
    from training.report import build_report

    await db.upgrade_async(settings.database.url)
    engine = db.create_engine(settings.database)
    try:
        page = await build_report(db.create_session_factory(engine), args.out)
    finally:
        await engine.dispose()
    print(f"Wrote {page}")
    return 0


async def _scheduler(settings: Settings) -> int:
    import signal

    from core.observability import serve_scheduler
    from core.scheduler import run_scheduler

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stop.set)
    async with serve_scheduler(settings):
        await run_scheduler(settings, stop)
    return 0


async def _discord_sync(args: argparse.Namespace, settings: Settings) -> int:
    from bots.discord_adapter import DiscordAdapter

    secrets = load_secrets()
    if secrets.discord_bot_token is None:
        print("mindharbor: DISCORD_BOT_TOKEN is not set", file=sys.stderr)
        return 2
    if args.guild:
        settings.discord.command_guild_ids = args.guild
    adapter = DiscordAdapter(
        manager=None,
        settings=settings.discord,
        token=secrets.discord_bot_token.get_secret_value(),
    )
    names = await adapter.login_and_sync()
    print(f"Registered {len(names)} commands: {', '.join(names)}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from training.recipe import load_recipe
    from training.train import TrainingError, print_summary, train

    if not args.recipe.is_file():
        print(f"mindharbor: recipe {str(args.recipe)!r} not found", file=sys.stderr)
        return 2
    recipe = load_recipe(
        args.recipe,
        data_dir=args.data,
        output_dir=args.out,
        model=args.model,
        max_steps=args.max_steps,
    )
    resume: str | bool | None = None
    if args.resume == "latest":
        resume = True
    elif args.resume is not None:
        resume = args.resume
    try:
        result = train(recipe, resume=resume, progress=not args.no_progress)
    except TrainingError as exc:
        print(f"mindharbor: {exc}", file=sys.stderr)
        return 1
    if result.is_main_process:
        print_summary(result)
    return 0


async def _retrain(settings: Settings) -> int:
    from training.retrain import RetrainError, format_decision, retrain

    await db.upgrade_async(settings.database.url)
    engine = db.create_engine(settings.database)
    try:
        result = await retrain(settings, load_secrets(), db.create_session_factory(engine))
    except RetrainError as exc:
        print(f"mindharbor: {exc}", file=sys.stderr)
        return 1
    finally:
        await engine.dispose()
    metrics = result.metrics
    losses = [metrics.get("eval_loss_before"), metrics.get("eval_loss_after")]
    loss_text = " -> ".join(f"{value:.4f}" for value in losses if value is not None) or "-"
    print(f"Trained {result.version}: {metrics['steps']} steps, validation loss {loss_text}")
    print(format_decision(result.decision))
    print(f"Details: {result.work_dir / 'decision.json'}")
    return 0


async def _adapters(args: argparse.Namespace, settings: Settings) -> int:
    from core import adapter_versions

    await db.upgrade_async(settings.database.url)
    engine = db.create_engine(settings.database)
    sessions = db.create_session_factory(engine)
    try:
        if args.adapters_command == "promote":
            try:
                await adapter_versions.promote(sessions, args.version)
            except LookupError as exc:
                print(f"mindharbor: {exc}", file=sys.stderr)
                return 2
            print(f"Promoted {args.version}; generators that follow the promoted version switch")
            return 0
        versions = await adapter_versions.list_versions(sessions)
    finally:
        await engine.dispose()
    if not versions:
        print("No adapter versions yet; `mindharbor retrain` trains and records one")
    else:
        print("version          status     trained           mean scores  folder")
    for row in versions:
        means = (row.scores or {}).get("means") or {}
        scores = " ".join(
            f"{name}={value:.2f}" for name, value in means.items() if value is not None
        )
        print(
            f"{row.version}  {row.status:9}  {row.created_at:%Y-%m-%d %H:%M}  "
            f"{scores or 'not scored'}  {row.path}"
        )
    return 0


def _convert(args: argparse.Namespace) -> int:
    from training.chatglm3 import ConversionError, convert_adapter, convert_checkpoint
    from training.chatglm3_tokenizer import TokenizerConversionError, convert_tokenizer

    try:
        if args.convert_command == "chatglm3":
            if not (args.src / "tokenizer.model").is_file():
                print(
                    f"mindharbor: {str(args.src)!r} has no tokenizer.model, so the converted "
                    "folder would have no tokenizer; copy tokenizer.model from the ChatGLM3 "
                    "model repository into it first",
                    file=sys.stderr,
                )
                return 2
            convert_checkpoint(args.src, args.dst, tokenizer=convert_tokenizer)
        else:
            convert_adapter(args.src, args.dst, base=args.base)
    except (ConversionError, TokenizerConversionError) as exc:
        print(f"mindharbor: {exc}", file=sys.stderr)
        return 2
    print(f"Converted {args.src} to {args.dst}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from training.merge import MergeError, merge_adapter

    try:
        out = merge_adapter(args.adapter, args.out, base=args.base)
    except MergeError as exc:
        print(f"mindharbor: {exc}", file=sys.stderr)
        return 2
    print(f"Merged {args.adapter} into its base model: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
