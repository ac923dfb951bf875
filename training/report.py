"""The rubric report: an HTML page with PNG plots, built from the scores in the database.

Sections: a summary with the judge error rate, the score distribution per
criterion, the mean with a 95 % confidence interval per adapter version, the
trend per week, the dialogues rated under 3 for safety (for moderators; no
user ids), the judge's spread across repeats, and how often replies hit the
length limit or repeated themselves. The page needs no network.
"""

from __future__ import annotations

import datetime as dt
import html
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.storage.models import AdapterVersion, Role, RubricScore, Turn, as_utc, utcnow
from training.rubric import CRITERIA, pair_agreement, spread_per_criterion

LABELS = {
    "therapeutic_relevance": "Therapeutic relevance",
    "user_engagement": "User engagement",
    "safety": "Safety",
    "problem_resolution": "Problem resolution",
}
SECTIONS = (
    "Summary",
    "Score distribution",
    "Adapter versions",
    "Trend",
    "Dialogues rated under 3 for safety",
    "Judge reliability",
    "Reply length and repetition",
)


@dataclass(frozen=True, slots=True)
class ReplyStats:
    replies: int
    length_limited: int
    repetition_trimmed: int


async def build_report(
    sessions: async_sessionmaker[AsyncSession], out_dir: Path, *, reply_days: int = 90
) -> Path:
    """Write index.html and its plots to ``out_dir`` and return the page's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    async with sessions() as session:
        rows = list((await session.execute(select(RubricScore))).scalars())
        replies = await _reply_stats(session, reply_days)
        versions = list(
            (
                await session.execute(select(AdapterVersion).order_by(AdapterVersion.created_at))
            ).scalars()
        )
    pairs = [row for row in rows if row.source.startswith("pairs:")]
    rows = [row for row in rows if not row.source.startswith("pairs:")]
    scored = [row for row in rows if row.scores]
    errors = [row for row in rows if not row.scores]

    _plot_distribution(scored, out_dir / "distribution.png")
    by_adapter = _plot_adapters(scored, out_dir / "adapters.png")
    _plot_trend(scored, out_dir / "trend.png")

    page = _render(rows, scored, errors, by_adapter, replies, pair_agreement(pairs), versions)
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


async def _reply_stats(session: AsyncSession, days: int) -> ReplyStats:
    since = utcnow() - dt.timedelta(days=days)
    metas = (
        await session.execute(
            select(Turn.meta).where(Turn.role == Role.ASSISTANT, Turn.created_at >= since)
        )
    ).scalars()
    replies = length = repetition = 0
    for meta in metas:
        replies += 1
        reason = (meta or {}).get("finish_reason")
        length += reason == "length"
        repetition += reason == "repetition"
    return ReplyStats(replies, length, repetition)


def _mean_ci(values: list[int]) -> tuple[float, float]:
    """Return the mean and the half-width of its 95 % confidence interval (normal approximation)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, 1.96 * statistics.stdev(values) / math.sqrt(len(values))


def _plot_distribution(rows: list[RubricScore], path: Path) -> None:
    figure, axes = plt.subplots(1, 4, figsize=(12, 3), sharey=True)
    for axis, name in zip(axes, CRITERIA, strict=True):
        counts = [sum(1 for row in rows if row.scores[name] == level) for level in range(1, 6)]
        axis.bar(range(1, 6), counts, color="#4a7ab5")
        axis.set_title(LABELS[name], fontsize=10)
        axis.set_xticks(range(1, 6))
        axis.set_xlabel("score")
    axes[0].set_ylabel("dialogues")
    if not rows:
        _mark_empty(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_adapters(
    rows: list[RubricScore], path: Path
) -> dict[str, dict[str, tuple[float, float, int]]]:
    groups: dict[str, list[RubricScore]] = defaultdict(list)
    for row in rows:
        groups[row.adapter_version or "unknown"].append(row)
    summary = {
        version: {
            name: (*_mean_ci([row.scores[name] for row in members]), len(members))
            for name in CRITERIA
        }
        for version, members in sorted(groups.items())
    }
    figure, axis = plt.subplots(figsize=(10, 3.5))
    width = 0.8 / max(1, len(summary))
    for index, (version, values) in enumerate(summary.items()):
        positions = [position + index * width for position in range(len(CRITERIA))]
        means = [values[name][0] for name in CRITERIA]
        errors = [values[name][1] for name in CRITERIA]
        axis.bar(positions, means, width, yerr=errors, capsize=3, label=version)
    axis.set_xticks([position + 0.4 - width / 2 for position in range(len(CRITERIA))])
    axis.set_xticklabels([LABELS[name] for name in CRITERIA], fontsize=9)
    axis.set_ylim(0, 5.5)
    axis.set_ylabel("mean score, 95 % CI")
    if summary:
        axis.legend(fontsize=8)
    else:
        _mark_empty(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return summary


def _plot_trend(rows: list[RubricScore], path: Path) -> None:
    weeks: dict[dt.date, list[RubricScore]] = defaultdict(list)
    for row in rows:
        created = as_utc(row.created_at) or utcnow()
        monday = (created - dt.timedelta(days=created.weekday())).date()
        weeks[monday].append(row)
    figure, axis = plt.subplots(figsize=(10, 3))
    ordered = sorted(weeks)
    for name in CRITERIA:
        means = [statistics.fmean(row.scores[name] for row in weeks[week]) for week in ordered]
        axis.plot(ordered, means, marker="o", label=LABELS[name])
    axis.set_ylim(0.5, 5.5)
    axis.set_ylabel("mean score per week")
    if ordered:
        axis.legend(fontsize=8)
    else:
        axis.set_xticks([])
        _mark_empty(figure)
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _render(
    rows: list[RubricScore],
    scored: list[RubricScore],
    errors: list[RubricScore],
    by_adapter: dict[str, dict[str, tuple[float, float, int]]],
    replies: ReplyStats,
    agreement: dict[str, dict[str, tuple[int, int]]],
    versions: list[AdapterVersion],
) -> str:
    escape = html.escape
    agreement_text = (
        "; ".join(
            f"{escape(judge)}: "
            + ", ".join(
                f"{LABELS[name]} {right}/{total}" for name, (right, total) in sorted(counts.items())
            )
            for judge, counts in sorted(agreement.items())
        )
        or "not measured (run mindharbor score --pairs bench/eval/data/judge_pairs.jsonl)"
    )
    error_rate = len(errors) / len(rows) if rows else 0.0
    judges = sorted({f"{row.judge_model} ({row.prompt_version})" for row in rows})
    adapter_rows = "".join(
        f"<tr><td>{escape(version)}</td>"
        + "".join(f"<td>{values[name][0]:.2f} ± {values[name][1]:.2f}</td>" for name in CRITERIA)
        + f"<td>{values[CRITERIA[0]][2]}</td></tr>"
        for version, values in by_adapter.items()
    )
    decision_rows = "".join(_decision_row(version) for version in versions)
    unsafe = sorted(
        (row for row in scored if row.scores["safety"] < 3), key=lambda row: row.scores["safety"]
    )
    unsafe_rows = "".join(
        f"<tr><td>{escape(row.dialogue_key[:12])}</td><td>{row.scores['safety']}</td>"
        f"<td>{escape(row.adapter_version or '-')}</td>"
        f"<td>{escape(_first_user_turn(row)[:160])}</td>"
        f"<td>{escape((row.reasons or {}).get('safety', ''))}</td></tr>"
        for row in unsafe
    )
    spreads = spread_per_criterion(scored)
    spread_text = (
        ", ".join(f"{LABELS[name]} {value:.2f}" for name, value in spreads.items())
        if spreads
        else "no dialogue was scored more than once (use mindharbor score --repeat K)"
    )
    length_rate = replies.length_limited / replies.replies if replies.replies else 0.0
    repetition_rate = replies.repetition_trimmed / replies.replies if replies.replies else 0.0
    error_list = "".join(
        f"<li>{escape(row.dialogue_key[:12])}: {escape(row.error or '')}</li>"
        for row in errors[:50]
    )
    header = "".join(f"<th>{LABELS[name]}</th>" for name in CRITERIA)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MindHarbor rubric report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 70em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>MindHarbor rubric report</h1>
<p>Built {escape(utcnow().strftime("%Y-%m-%d %H:%M UTC"))}.</p>
<h2>{SECTIONS[0]}</h2>
<p>{len(rows)} judgements of {len({row.dialogue_key for row in rows})} dialogues;
{len(scored)} scores and {len(errors)} judge errors (error rate {error_rate:.1%},
left out of every figure below). Judges: {escape(", ".join(judges) or "-")}.</p>
<ul>{error_list}</ul>
<h2>{SECTIONS[1]}</h2>
<img src="distribution.png" alt="score distribution per criterion">
<h2>{SECTIONS[2]}</h2>
<img src="adapters.png" alt="mean score per adapter version with 95 % confidence interval">
<table><tr><th>adapter version</th>{header}<th>n</th></tr>{adapter_rows}</table>
<h3>Retraining decisions</h3>
<table><tr><th>version</th><th>status</th><th>trained</th><th>compared with</th>
<th>candidate means</th><th>current means</th><th>reasons</th></tr>{decision_rows}</table>
<h2>{SECTIONS[3]}</h2>
<img src="trend.png" alt="mean score per week">
<h2>{SECTIONS[4]}</h2>
<table><tr><th>dialogue</th><th>safety</th><th>adapter version</th><th>first user turn</th>
<th>judge's reason</th></tr>{unsafe_rows}</table>
<p>{len(unsafe)} dialogues.</p>
<h2>{SECTIONS[5]}</h2>
<p>Mean spread (standard deviation) across repeated scorings of one dialogue:
{escape(spread_text)}.</p>
<p>Labelled pairs ranked right (the better dialogue scored higher on the pair's criterion):
{agreement_text}.</p>
<h2>{SECTIONS[6]}</h2>
<p>Of {replies.replies} replies stored in the last 90 days, {length_rate:.1%} stopped at the
length limit and {repetition_rate:.1%} were cut because they repeated themselves.</p>
</body></html>
"""


def _mark_empty(figure: plt.Figure) -> None:
    figure.text(0.5, 0.5, "no scores yet", ha="center", va="center", fontsize=14, color="#888")


def _decision_row(version: AdapterVersion) -> str:
    escape = html.escape
    decision = version.decision or {}

    def means(values: dict[str, float | None]) -> str:
        return ", ".join(
            f"{LABELS[name]} {values[name]:.2f}"
            for name in CRITERIA
            if values.get(name) is not None
        )

    return (
        f"<tr><td>{escape(version.version)}</td><td>{escape(version.status)}</td>"
        f"<td>{version.created_at:%Y-%m-%d %H:%M}</td>"
        f"<td>{escape(decision.get('current_version') or ('base model' if decision else '-'))}</td>"
        f"<td>{escape(means(decision.get('candidate') or {}))}</td>"
        f"<td>{escape(means(decision.get('current') or {}))}</td>"
        f"<td>{escape('; '.join(decision.get('reasons') or []))}</td></tr>"
    )


def _first_user_turn(row: RubricScore) -> str:
    return next((turn["content"] for turn in row.dialogue if turn["role"] == "user"), "")
