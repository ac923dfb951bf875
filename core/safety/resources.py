"""Crisis resources per region and language, from config/crisis_resources.yaml."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core import i18n
from core.errors import ConfigError

# A review older than this is reported at start-up.
REVIEW_MAX_AGE = dt.timedelta(days=365)


@dataclass(frozen=True, slots=True)
class CrisisResources:
    regions: Mapping[str, Mapping[str, Any]]
    elsewhere: Mapping[str, str]
    hint_regions: Mapping[str, Sequence[str]]
    locale_regions: Mapping[str, Sequence[str]]
    reviewed_by: str | None
    reviewed_on: dt.date | None

    @classmethod
    def load(cls, path: Path) -> CrisisResources:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(
                f"Cannot read the crisis resources {str(path)!r}: {exc.strerror}"
            ) from None
        try:
            resources = cls(
                regions=data["regions"],
                elsewhere=data["elsewhere"],
                hint_regions={key.lower(): value for key, value in data["hint_regions"].items()},
                locale_regions=data["locale_regions"],
                reviewed_by=data.get("reviewed_by") or None,
                reviewed_on=data.get("reviewed_on") or None,
            )
            for region in resources.regions.values():
                for line in region["lines"]:
                    line["number"]
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"Invalid crisis resources {str(path)!r}: missing {exc}") from None
        return resources

    def regions_for(self, locale: str, hint: str | None) -> list[str]:
        """Return the regions whose resources are shown for this locale and language hint."""
        if hint:
            lowered = hint.strip().lower().replace("_", "-")
            for key in (lowered, lowered.split("-")[0]):
                if key in self.hint_regions:
                    return list(self.hint_regions[key])
        return list(self.locale_regions.get(locale, []))

    def render(self, locale: str, hint: str | None = None) -> str:
        """Return the crisis resources block for a reply, in ``locale``."""
        lines = [i18n.text("crisis_resources_header", locale)]
        for code in self.regions_for(locale, hint):
            region = self.regions.get(code)
            if region is None:
                continue
            colon = "：" if locale.startswith("zh") else ":"
            lines.append(f"{_localized(region['name'], locale)}{colon}")
            for line in region["lines"]:
                lines.append("• " + _describe_line(line, locale))
            chinese = locale.startswith("zh")
            emergency = ("、" if chinese else ", ").join(
                f"{item['number']}（{_localized(item['name'], locale)}）"
                if chinese
                else f"{item['number']} ({_localized(item['name'], locale)})"
                for item in region.get("emergency", [])
            )
            if emergency:
                lines.append("• " + i18n.text("crisis_emergency", locale, numbers=emergency))
        lines.append(_localized(self.elsewhere, locale))
        return "\n".join(lines)

    def review_warnings(self, today: dt.date | None = None) -> list[str]:
        """Return what start-up should warn about: a missing or old review, unconfirmed lines."""
        today = today or dt.date.today()
        warnings = []
        if not self.reviewed_by or not self.reviewed_on:
            warnings.append(
                "The crisis resources file records no review (reviewed_by and reviewed_on); "
                "check every number and add them."
            )
        elif today - self.reviewed_on > REVIEW_MAX_AGE:
            warnings.append(
                f"The crisis resources were last reviewed on {self.reviewed_on}, more than a "
                "year ago; check every number and update reviewed_on."
            )
        unconfirmed = [
            f"{entry['number']} ({code})"
            for code, region in self.regions.items()
            for entry in [*region["lines"], *region.get("emergency", [])]
            if not entry.get("confirmed")
        ]
        if unconfirmed:
            warnings.append(
                f"Crisis resources without a confirmation source: {', '.join(unconfirmed)}; "
                "check them and fill in `confirmed`."
            )
        return warnings


def _localized(value: Mapping[str, str] | str, locale: str) -> str:
    if isinstance(value, str):
        return value
    return value.get(locale) or value["en"]


def _describe_line(line: Mapping[str, Any], locale: str) -> str:
    chinese = locale.startswith("zh")
    colon, separator = ("：", "；") if chinese else (": ", "; ")
    text = f"{_localized(line['name'], locale)}{colon}{line['number']}"
    details = [
        _localized(line[key], locale) for key in ("how", "hours") if line.get(key) is not None
    ]
    if details:
        joined = separator.join(details)
        text += f"（{joined}）" if chinese else f" ({joined})"
    if line.get("url"):
        text += f" {line['url']}"
    return text
