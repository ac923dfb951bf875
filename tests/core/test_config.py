"""Settings: YAML defaults, environment overrides, clear errors for invalid values."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import load_secrets, load_settings, normalise_locale
from core.errors import ConfigError


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_default_file_loads() -> None:
    settings = load_settings()
    assert settings.database.url.startswith("sqlite+aiosqlite://")
    assert settings.generator.backend == "local"
    assert set(settings.prompt.system_prompts) == {"en", "zh-CN"}


def test_environment_overrides_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(
        tmp_path, "generator:\n  backend: local\n  sampling:\n    temperature: 0.3\n"
    )
    monkeypatch.setenv("MINDHARBOR_GENERATOR__BACKEND", "openai")
    monkeypatch.setenv("MINDHARBOR_DATABASE__URL", "postgresql+asyncpg://postgres@127.0.0.1/test")

    settings = load_settings(path)

    assert settings.generator.backend == "openai"
    assert settings.generator.sampling.temperature == 0.3
    assert settings.database.url == "postgresql+asyncpg://postgres@127.0.0.1/test"


def test_invalid_value_names_key_and_allowed_values(tmp_path: Path) -> None:
    path = write_config(tmp_path, "generator:\n  backend: gpt\n")
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    message = str(error.value)
    assert "generator.backend (env MINDHARBOR_GENERATOR__BACKEND)" in message
    assert "'local' or 'openai'" in message
    assert "got 'gpt'" in message


def test_invalid_environment_value_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINDHARBOR_GENERATOR__SAMPLING__TEMPERATURE", "hot")
    with pytest.raises(ConfigError, match=r"generator\.sampling\.temperature"):
        load_settings()


def test_list_from_environment_is_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINDHARBOR_TELEGRAM__MODERATOR_IDS", "[111, 222]")
    assert load_settings().telegram.moderator_ids == [111, 222]

    monkeypatch.setenv("MINDHARBOR_TELEGRAM__MODERATOR_IDS", "111,222")
    with pytest.raises(ConfigError, match=r"Lists and mappings are JSON"):
        load_settings()


def test_unknown_key_is_rejected(tmp_path: Path) -> None:
    path = write_config(tmp_path, "generator:\n  bakend: local\n")
    with pytest.raises(ConfigError, match=r"generator\.bakend .*unknown key"):
        load_settings(path)


def test_secret_in_yaml_is_rejected(tmp_path: Path) -> None:
    path = write_config(tmp_path, "openai_api_key: sk-should-not-be-here\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_settings(path)


def test_database_url_needs_async_driver(tmp_path: Path) -> None:
    path = write_config(tmp_path, "database:\n  url: postgresql://localhost/x\n")
    with pytest.raises(ConfigError, match="postgresql\\+asyncpg://"):
        load_settings(path)


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")


def test_secrets_come_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINDHARBOR_OPENAI_API_KEY", "sk-test")
    assert load_secrets().openai_api_key.get_secret_value() == "sk-test"
    assert "sk-test" not in repr(load_secrets())


@pytest.mark.parametrize(
    ("hint", "expected"),
    [
        ("zh", "zh-CN"),
        ("zh-hans", "zh-CN"),
        ("zh_TW", "zh-CN"),
        ("en-US", "en"),
        ("fr", "en"),
        (None, "en"),
    ],
)
def test_locale_hints(hint: str | None, expected: str) -> None:
    assert normalise_locale(hint) == expected
