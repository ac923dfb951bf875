"""The console adapter: an interactive chat in the terminal, and replay of recorded dialogues."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import signal
import statistics
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import func, select

from core import i18n
from core.manager import ConversationManager, IncomingMessage, Reply, ReplyKind
from core.service import Service
from core.storage.models import Turn, User

_LOGGER = logging.getLogger(__name__)

PLATFORM = "console"


# Interactive chat


async def run_interactive(
    service: Service,
    *,
    user_id: str | None = None,
    locale_hint: str | None = None,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
) -> None:
    """Chat with the local user until end of input; history persists across runs."""
    manager = service.manager
    template = IncomingMessage(
        platform=PLATFORM,
        chat_id="console",
        user_id=user_id or getpass.getuser(),
        text="",
        locale_hint=locale_hint,
    )
    locale = await manager.user_locale(template)
    print(i18n.text("console_welcome", locale), file=stdout, flush=True)

    while True:
        print("> ", end="", file=stdout, flush=True)
        line = await _read_line(stdin)
        if not line:
            print(file=stdout)
            return
        message = IncomingMessage(
            platform=template.platform,
            chat_id=template.chat_id,
            user_id=template.user_id,
            text=line.rstrip("\n"),
            locale_hint=locale_hint,
        )

        command, _, argument = message.text.strip().partition(" ")
        if command.startswith("/") and len(command) > 1:
            reply = await _run_command(manager, message, command, argument)
            print(reply.text, file=stdout, flush=True)
            continue

        printer = _ReplyPrinter(stdout)
        reply = await manager.handle(message, on_delta=printer.on_delta)
        printer.finish(reply)


async def _read_line(stdin: TextIO) -> str:
    """Read one line in a daemon thread, so that a stop signal need not wait for the user.

    The default executor of asyncio.to_thread is joined when the event loop closes, and a
    thread blocked on a terminal would keep the process alive until the next Enter.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()

    def read() -> None:
        try:
            line = stdin.readline()
        except (OSError, ValueError) as exc:
            loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, future, line, None)

    threading.Thread(target=read, name="console-stdin", daemon=True).start()
    return await future


def _settle(future: asyncio.Future[str], line: str | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(line or "")


async def run_until_terminated(chat: Coroutine[Any, Any, None]) -> None:
    """Run a console chat until it ends or SIGTERM arrives, and then end it quietly.

    A reply in progress at SIGTERM is cancelled. Its user turn is already stored.
    """
    loop = asyncio.get_running_loop()
    terminated = asyncio.Event()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, terminated.set)
    task = asyncio.ensure_future(chat)
    waiter = asyncio.ensure_future(terminated.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)
        waiter.cancel()
    if not task.done():
        _LOGGER.info("Received SIGTERM: ending the console chat")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return
    task.result()


class _ReplyPrinter:
    """Print a reply as it streams in, then make sure the stored reply is what is shown."""

    def __init__(self, stdout: TextIO) -> None:
        self._stdout = stdout
        self._pieces: list[str] = []

    async def on_delta(self, delta: str) -> None:
        if not self._pieces:
            print("MindHarbor: ", end="", file=self._stdout)
        self._pieces.append(delta)
        print(delta, end="", file=self._stdout, flush=True)

    def finish(self, reply: Reply) -> None:
        streamed = "".join(self._pieces)
        if streamed and reply.kind is ReplyKind.GENERATED:
            # The stored reply continues the streamed text when held-back text or
            # crisis resources follow it. When clean-up trimmed the text or
            # screening replaced it, the reply differs and is shown whole.
            if reply.text.startswith(streamed):
                print(reply.text[len(streamed) :], end="", file=self._stdout)
            elif streamed.strip() != reply.text.strip():
                # Say which of the two texts counts, so the reply does not look repeated.
                note = i18n.text("console_reply_replaced", reply.locale)
                print(f"\n{note}\nMindHarbor: {reply.text}", end="", file=self._stdout)
            print(file=self._stdout, flush=True)
        elif reply.should_send:
            prefix = "\n" if streamed else ""
            print(f"{prefix}MindHarbor: {reply.text}", file=self._stdout, flush=True)


async def _run_command(
    manager: ConversationManager, message: IncomingMessage, command: str, argument: str
) -> Reply:
    name = command.lower()
    if name == "/reset":
        return await manager.reset(message)
    if name == "/lang":
        return await manager.set_locale(message, argument)
    if name in ("/help", "/start"):
        return await manager.notice(message, "help")
    if name == "/privacy":
        return await manager.privacy_notice(message)
    if name == "/forget":
        if argument.strip().lower() == "yes":
            return await manager.forget(message)
        return await manager.notice(message, "forget_console_confirm")
    if name in ("/agree", "/withdraw"):
        return await manager.set_storage_consent(message, name == "/agree")
    if name in ("/optin", "/optout"):
        return await manager.set_training_consent(message, name == "/optin")
    return await manager.notice(message, "unknown_command", command=command)


# Replay of recorded dialogues


@dataclass(slots=True)
class Dialogue:
    ident: str
    user_turns: list[str]


@dataclass(slots=True)
class ReplayReport:
    dialogues: int = 0
    user_turns: int = 0
    replies: int = 0
    apologies: int = 0
    other: int = 0
    skipped_lines: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    stored_turns: int = 0


def read_dialogues(path: Path, limit: int | None = None) -> Iterator[Dialogue | str]:
    """Yield each dialogue of a training-format JSONL file, or a note for each other line."""
    count = 0
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if limit is not None and count >= limit:
                return
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                turns = record["conversations"]
                user_turns = [
                    str(turn["content"])
                    for turn in turns
                    if turn.get("role") == "user" and str(turn.get("content", "")).strip()
                ]
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                kind = exc.__class__.__name__
                yield f"line {number}: not a dialogue in the training format ({kind})"
                continue
            if not user_turns:
                yield f"line {number}: no user turn"
                continue
            count += 1
            yield Dialogue(str(record.get("id") or f"line-{number}"), user_turns)


async def replay(
    service: Service,
    path: Path,
    *,
    limit: int | None = None,
    concurrency: int = 1,
    stdout: TextIO = sys.stdout,
) -> ReplayReport:
    """Play each dialogue's user turns as one new user per dialogue and print every reply."""
    manager = service.manager
    report = ReplayReport()
    run = time.strftime("%Y%m%dT%H%M%S")
    dialogues: list[Dialogue] = []
    for item in read_dialogues(path, limit):
        if isinstance(item, str):
            report.skipped_lines.append(item)
            print(f"skipped {item}", file=stdout)
        else:
            dialogues.append(item)

    user_ids = [
        f"replay-{run}-{index}-{dialogue.ident}"[:64] for index, dialogue in enumerate(dialogues)
    ]
    semaphore = asyncio.Semaphore(max(1, concurrency))

    async def play(dialogue: Dialogue, user_id: str) -> None:
        async with semaphore:
            # Replay users are the operator's test users, so they agree to storage up front,
            # as a person would with /agree; otherwise require_consent stores nothing.
            await manager.set_storage_consent(
                IncomingMessage(platform=PLATFORM, chat_id="replay", user_id=user_id, text=""),
                True,
            )
            for number, text in enumerate(dialogue.user_turns):
                message = IncomingMessage(
                    platform=PLATFORM,
                    chat_id="replay",
                    user_id=user_id,
                    text=text,
                    message_id=str(number),
                )
                reply = await manager.handle(message)
                report.user_turns += 1
                report.latencies_s.append(reply.latency_s)
                if reply.kind is ReplyKind.GENERATED:
                    report.replies += 1
                elif reply.kind is ReplyKind.APOLOGY:
                    report.apologies += 1
                else:
                    report.other += 1
                print(
                    f"[{dialogue.ident} #{number + 1}] user: {text}\n"
                    f"[{dialogue.ident} #{number + 1}] MindHarbor "
                    f"({reply.latency_s * 1000:.0f} ms, "
                    f"{reply.kind.value}): {reply.text}",
                    file=stdout,
                    flush=True,
                )

    await asyncio.gather(
        *(play(dialogue, user_id) for dialogue, user_id in zip(dialogues, user_ids, strict=True))
    )
    report.dialogues = len(dialogues)
    report.stored_turns = await _count_stored_turns(service, user_ids)
    _print_summary(report, stdout)
    return report


async def _count_stored_turns(service: Service, user_ids: list[str]) -> int:
    if not user_ids:
        return 0
    async with service.engine.connect() as connection:
        statement = (
            select(func.count(Turn.id))
            .join(User, User.id == Turn.user_id)
            .where(User.platform == PLATFORM, User.platform_user_id.in_(user_ids))
        )
        return int((await connection.execute(statement)).scalar_one())


def _print_summary(report: ReplayReport, stdout: TextIO) -> None:
    latencies = sorted(report.latencies_s)
    if latencies:
        p50 = statistics.median(latencies) * 1000
        p95 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))] * 1000
        timing = f"latency p50 {p50:.0f} ms, p95 {p95:.0f} ms"
    else:
        timing = "no latency figures"
    print(
        f"\nReplayed {report.dialogues} {'dialogue' if report.dialogues == 1 else 'dialogues'}: "
        f"{report.user_turns} user turns, "
        f"{report.replies} replies, {report.apologies} apologies, {report.other} other; "
        f"{timing}; {report.stored_turns} turns stored for these users; "
        f"{len(report.skipped_lines)} lines skipped.",
        file=stdout,
        flush=True,
    )
