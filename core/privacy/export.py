"""Anonymised exports of consented conversations, deletion tombstones and retention purges.

An export contains the conversations of users who consented to training, with
a turn stored since the previous export, as JSONL in the training format
(``{"conversations": [{"role", "content"}, ...], "user": pseudonym}``) plus a
manifest. Text is scrubbed of personal data, users are keyed pseudonyms, and
tombstoned users are left out. Rows are streamed from the database, so memory
does not grow with the number of turns; files appear under their final names
only when complete, and the manifest (written last) names the data file's
SHA-256.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.privacy.scrub import scrub
from core.pseudonym import Pseudonymizer
from core.storage.models import (
    ExportRecord,
    RetentionRun,
    Role,
    Tombstone,
    Turn,
    User,
    as_utc,
    utcnow,
)

_LOGGER = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Stored roles and the role each has in the training format.
_TRAINING_ROLES = {Role.USER: "user", Role.ASSISTANT: "assistant", Role.MODERATOR: "assistant"}


@dataclass(frozen=True, slots=True)
class ExportResult:
    path: Path
    manifest_path: Path
    dialogues: int
    turns: int
    sha256: str
    period_start: dt.datetime | None
    period_end: dt.datetime
    tombstones_applied: int


async def add_tombstone(session: AsyncSession, pseudonym: str) -> None:
    """Record a deleted user's pseudonym, once."""
    exists = await session.scalar(select(Tombstone.id).where(Tombstone.pseudonym == pseudonym))
    if exists is None:
        session.add(Tombstone(pseudonym=pseudonym, created_at=utcnow()))


async def export_conversations(
    sessions: async_sessionmaker[AsyncSession],
    *,
    out_dir: Path,
    pseudonyms: Pseudonymizer,
    now: dt.datetime | None = None,
    batch_size: int = 2000,
) -> ExportResult:
    """Write the conversations stored since the last export; see the module docstring."""
    now = now or utcnow()
    out_dir.mkdir(parents=True, exist_ok=True)
    async with sessions() as session:
        period_start = as_utc(await session.scalar(select(func.max(ExportRecord.period_end))))
        tombstones = set((await session.execute(select(Tombstone.pseudonym))).scalars())

    stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
    data_path = out_dir / f"export-{stamp}.jsonl"
    manifest_path = out_dir / f"export-{stamp}.manifest.json"
    partial = data_path.with_name(data_path.name + ".partial")

    digest = hashlib.sha256()
    dialogues = turns = skipped_tombstoned = 0
    first_turn_at: dt.datetime | None = None
    last_turn_at: dt.datetime | None = None
    with partial.open("wb") as file:
        async with sessions() as session:
            rows = _conversation_rows(session, period_start, now, batch_size)
            async for user_key, conversation, first, last in rows:
                pseudonym = pseudonyms.pseudonym(*user_key)
                if pseudonym in tombstones:
                    skipped_tombstoned += 1
                    continue
                messages = training_messages(conversation)
                if not messages:
                    continue
                line = json.dumps(
                    {"conversations": messages, "user": pseudonym}, ensure_ascii=False
                ).encode("utf-8")
                _write(file, digest, line + b"\n")
                dialogues += 1
                turns += len(messages)
                first_turn_at = first if first_turn_at is None else min(first_turn_at, first)
                last_turn_at = last if last_turn_at is None else max(last_turn_at, last)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, data_path)

    sha256 = digest.hexdigest()
    manifest = {
        "format_version": FORMAT_VERSION,
        "file": data_path.name,
        "sha256": sha256,
        "dialogues": dialogues,
        "turns": turns,
        "period_start": period_start.isoformat() if period_start else None,
        "period_end": now.isoformat(),
        "first_turn_at": first_turn_at.isoformat() if first_turn_at else None,
        "last_turn_at": last_turn_at.isoformat() if last_turn_at else None,
        "tombstones_applied": len(tombstones),
        "dialogues_left_out_by_tombstones": skipped_tombstoned,
        "tombstones_file": "tombstones.txt",
        "created_at": utcnow().isoformat(),
    }
    _write_atomically(manifest_path, json.dumps(manifest, indent=2).encode("utf-8") + b"\n")
    # Every tombstone so far, so that datasets built from earlier exports can drop them too.
    _write_atomically(
        out_dir / "tombstones.txt", "".join(f"{value}\n" for value in sorted(tombstones)).encode()
    )

    async with sessions.begin() as session:
        session.add(
            ExportRecord(
                created_at=utcnow(),
                period_start=period_start,
                period_end=now,
                path=str(data_path),
                dialogues=dialogues,
                turns=turns,
                sha256=sha256,
            )
        )
    _LOGGER.info(
        "Exported %d dialogues (%d turns) to %s; %d left out by tombstones",
        dialogues,
        turns,
        data_path,
        skipped_tombstoned,
    )
    return ExportResult(
        data_path,
        manifest_path,
        dialogues,
        turns,
        sha256,
        period_start,
        now,
        len(tombstones),
    )


async def purge_old_turns(
    sessions: async_sessionmaker[AsyncSession],
    *,
    retention_days: int,
    now: dt.datetime | None = None,
    batch_size: int = 5000,
) -> int:
    """Delete turns stored more than ``retention_days`` ago; record and return the count."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(days=retention_days)
    deleted = 0
    while True:
        # Batches keep each transaction short on a large table.
        async with sessions.begin() as session:
            ids = list(
                (
                    await session.execute(
                        select(Turn.id).where(Turn.created_at < cutoff).limit(batch_size)
                    )
                ).scalars()
            )
            if not ids:
                break
            await session.execute(delete(Turn).where(Turn.id.in_(ids)))
            deleted += len(ids)
    async with sessions.begin() as session:
        session.add(RetentionRun(ran_at=now, cutoff=cutoff, turns_deleted=deleted))
    _LOGGER.info("Retention purge deleted %d turns stored before %s", deleted, cutoff.isoformat())
    return deleted


async def _conversation_rows(
    session: AsyncSession, start: dt.datetime | None, end: dt.datetime, batch_size: int
) -> Any:
    """Yield ((platform, platform user id), [(role, content)], first time, last time) per
    conversation that has a turn in [start, end), for users who consented to training."""
    in_window = select(Turn.conversation_id).where(Turn.created_at < end)
    if start is not None:
        in_window = in_window.where(Turn.created_at >= start)
    statement = (
        select(
            Turn.conversation_id,
            Turn.role,
            Turn.content,
            Turn.revision,
            Turn.created_at,
            Turn.meta,
            User.platform,
            User.platform_user_id,
        )
        .join(User, User.id == Turn.user_id)
        .where(
            User.training_consent.is_(True),
            Turn.created_at < end,
            Turn.conversation_id.in_(in_window.distinct()),
        )
        .order_by(Turn.conversation_id, Turn.created_at, Turn.id)
        .execution_options(yield_per=batch_size)
    )
    current: int | None = None
    user_key: tuple[str, str] = ("", "")
    turns: list[tuple[Role, str]] = []
    first = last = end
    result = await session.stream(statement)
    async for row in result:
        conversation_id, role, content, revision, created_at, meta, platform, platform_user_id = row
        if conversation_id != current:
            if current is not None:
                yield user_key, turns, first, last
            current, user_key, turns = conversation_id, (platform, platform_user_id), []
            first = as_utc(created_at) or end
        last = as_utc(created_at) or end
        # An edit is stored as a later revision; the export keeps the text as first sent.
        # A turn kept without consent for the user's safety is never used for training.
        if revision == 0 and not (meta and meta.get("legal_basis")):
            turns.append((role, content))
    if current is not None:
        yield user_key, turns, first, last


def training_messages(turns: list[tuple[Role, str]]) -> list[dict[str, str]]:
    """Scrub, merge consecutive turns of one role, and drop a trailing unanswered user turn."""
    messages: list[dict[str, str]] = []
    for role, content in turns:
        training_role = _TRAINING_ROLES.get(role)
        text = content.strip()
        if training_role is None or not text:
            continue
        text = scrub(text)
        if messages and messages[-1]["role"] == training_role:
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": training_role, "content": text})
    while messages and messages[0]["role"] != "user":
        messages.pop(0)
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    return messages


def _write(file: IO[bytes], digest: Any, data: bytes) -> None:
    file.write(data)
    digest.update(data)


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)


def iter_export(path: Path) -> Iterator[dict[str, Any]]:
    """Read an export file line by line."""
    with path.open(encoding="utf-8") as file:
        for line in file:
            if line.strip():
                yield json.loads(line)
