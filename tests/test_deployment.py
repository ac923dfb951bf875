"""Deployment files: docker-compose.yml, the Dockerfile, .env.example and the Grafana dashboard."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from core.cli import build_parser
from core.config import Secrets, Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"

# The required secrets, left empty in .env.example for the operator to fill in.
REQUIRED_SECRETS = {"POSTGRES_PASSWORD", "MINDHARBOR_PSEUDONYM_KEY"}
# Variables read by the service or the postgres image that are not Settings fields.
OTHER_VARIABLES = {"POSTGRES_PASSWORD", "MINDHARBOR_CONFIG"}

METRIC_NAMES = {
    "mindharbor_messages_received_total",
    "mindharbor_messages_sent_total",
    "mindharbor_reply_latency_seconds",
    "mindharbor_generation_errors_total",
    "mindharbor_open_safety_cases",
    "mindharbor_scheduler_jobs_total",
    "mindharbor_generator_ready",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# One entry per line: NAME=value, or #NAME=value for a setting left at its default.
ENTRY = re.compile(r"^#?([A-Z][A-Z0-9_]*)=(.*)$")
COMPOSE_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


def setting_variables(model: type[BaseModel] = Settings, prefix: tuple[str, ...] = ()) -> set[str]:
    """Return the MINDHARBOR_* variable of every leaf setting, walking nested sections."""
    names: set[str] = set()
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= setting_variables(annotation, path)
        else:
            names.add("MINDHARBOR_" + "__".join(part.upper() for part in path))
    return names


def secret_variables() -> set[str]:
    return {field.alias for field in Secrets.model_fields.values() if field.alias}


def compose_variables() -> set[str]:
    return set(COMPOSE_VARIABLE.findall(COMPOSE_FILE.read_text(encoding="utf-8")))


def env_example_lines() -> list[str]:
    return ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()


def env_example_entries() -> list[tuple[int, str, str, bool]]:
    """Return (line index, name, value, commented) for every variable line of .env.example."""
    entries = []
    for index, line in enumerate(env_example_lines()):
        match = ENTRY.match(line)
        if match:
            entries.append((index, match.group(1), match.group(2), line.startswith("#")))
    return entries


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def seconds(duration: str) -> float:
    """Convert a compose duration such as 45s, 3m or 1m30s to seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", duration)
    assert parts, f"unreadable duration {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


# .env.example


def test_env_example_names_every_setting():
    names = {name for _, name, _, _ in env_example_entries()}
    missing = setting_variables() - names
    assert not missing, f"settings missing from .env.example: {sorted(missing)}"


def test_env_example_names_every_secret():
    names = {name for _, name, _, _ in env_example_entries()}
    missing = (secret_variables() | OTHER_VARIABLES) - names
    assert not missing, f"secrets missing from .env.example: {sorted(missing)}"


def test_env_example_names_compose_variables():
    names = {name for _, name, _, _ in env_example_entries()}
    missing = compose_variables() - names
    assert not missing, f"docker-compose.yml variables missing from .env.example: {missing}"


def test_env_example_names_nothing_unknown():
    names = {name for _, name, _, _ in env_example_entries()}
    known = setting_variables() | secret_variables() | OTHER_VARIABLES | compose_variables()
    unknown = names - known
    assert not unknown, f".env.example names variables nothing reads: {sorted(unknown)}"


def test_env_example_names_each_once():
    names = [name for _, name, _, _ in env_example_entries()]
    repeated = sorted({name for name in names if names.count(name) > 1})
    assert not repeated, f"names repeated in .env.example: {repeated}"


def test_env_example_comments_every_entry():
    lines = env_example_lines()
    for index, name, _, _ in env_example_entries():
        above = lines[index - 1] if index > 0 else ""
        assert above.startswith("# "), f"{name} has no comment line above it"


def test_env_example_sets_only_required_secrets():
    active = {name: value for _, name, value, commented in env_example_entries() if not commented}
    assert set(active) == REQUIRED_SECRETS
    for name, value in active.items():
        assert value == "", f"{name} must be empty in the example, not {value!r}"


def test_env_example_values_are_valid(monkeypatch):
    for name in list(os.environ):
        if name.startswith("MINDHARBOR_"):
            monkeypatch.delenv(name)
    settings = setting_variables()
    for _, name, value, _ in env_example_entries():
        if name in settings:
            monkeypatch.setenv(name, value)
    # Raises a ValidationError naming the variable when a shown value is invalid.
    Settings()


# docker-compose.yml


def test_compose_defines_services():
    services = load_compose()["services"]
    assert set(services) == {"postgres", "migrate", "bot", "scheduler", "inference", "trainer"}
    assert services["inference"]["profiles"] == ["gpu"]
    assert services["trainer"]["profiles"] == ["train"]
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])


def test_compose_commands_are_cli_commands():
    services = load_compose()["services"]
    expected = {
        "migrate": ["db", "upgrade"],
        "bot": ["run"],
        "scheduler": ["scheduler"],
        "trainer": ["retrain"],
    }
    parser = build_parser()
    for service, command in expected.items():
        assert services[service]["command"] == command
        # Raises SystemExit when the CLI has no such command.
        parser.parse_args(command)


def test_compose_waits_for_migrations():
    services = load_compose()["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("bot", "scheduler", "trainer"):
        depends_on = services[name]["depends_on"]
        assert depends_on["postgres"]["condition"] == "service_healthy", name
        assert depends_on["migrate"]["condition"] == "service_completed_successfully", name


def test_compose_services_share_image():
    services = load_compose()["services"]
    images = {services[name]["image"] for name in ("migrate", "bot", "scheduler", "trainer")}
    assert len(images) == 1
    for name in ("migrate", "bot", "scheduler", "trainer"):
        environment = services[name]["environment"]
        assert environment["MINDHARBOR_DATABASE__URL"].endswith(
            "postgresql+asyncpg://mindharbor@postgres:5432/mindharbor}"
        ), name
        assert "POSTGRES_PASSWORD" in environment["PGPASSWORD"], name
        assert services[name]["env_file"] == ".env", name


def test_compose_health_ports_match_settings():
    services = load_compose()["services"]
    options = Settings.model_fields["observability"].default
    ports = {"bot": options.port, "scheduler": options.scheduler_port}
    for name, port in ports.items():
        probe = " ".join(services[name]["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/healthz" in probe, name
        assert str(port) in services[name]["expose"], name


def test_compose_publishes_no_ports():
    services = load_compose()["services"]
    published = [name for name, service in services.items() if "ports" in service]
    assert not published


def test_compose_stop_outlasts_shutdown_grace():
    bot = load_compose()["services"]["bot"]
    grace_s = Settings.model_fields["shutdown_grace_s"].default
    assert seconds(bot["stop_grace_period"]) > grace_s


def test_compose_postgres_allows_enough_connections():
    command = load_compose()["services"]["postgres"]["command"]
    limits = [int(part.split("=")[1]) for part in command if part.startswith("max_connections=")]
    database = Settings.model_fields["database"].default
    # Maximum connections of one bot process: its pool with overflow, plus the lock pool.
    per_process = 2 * database.pool_size + database.lock_pool_size
    # Room for the bot, the scheduler and the trainer at once.
    assert limits and limits[0] >= 3 * per_process


def test_compose_reserves_gpus():
    services = load_compose()["services"]
    for name in ("inference", "trainer"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia", name
        assert devices[0]["capabilities"] == ["gpu"], name


def _compose_command() -> list[str]:
    """Return the Compose command: the docker plugin, else the standalone docker-compose.

    CI installs Debian's docker-compose 1.29 where the plugin is missing. It reads the
    same file format with profiles and ${VAR:?} checks, though its schema is older
    than the plugin's, so a key that only Compose v2 supports would fail here first.
    """
    docker = shutil.which("docker")
    if docker is not None:
        result = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone is not None:
        return [standalone]
    pytest.skip("neither docker compose nor docker-compose is installed")


def _compose_folder(tmp_path: Path, *, fill_secrets: bool) -> Path:
    """Copy the compose file and the Dockerfile into tmp_path, with .env from .env.example."""
    shutil.copy(COMPOSE_FILE, tmp_path / "docker-compose.yml")
    shutil.copy(DOCKERFILE, tmp_path / "Dockerfile")
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    if fill_secrets:
        text = text.replace("\nPOSTGRES_PASSWORD=\n", "\nPOSTGRES_PASSWORD=test-password\n")
        text = text.replace(
            "\nMINDHARBOR_PSEUDONYM_KEY=\n",
            "\nMINDHARBOR_PSEUDONYM_KEY=test-pseudonym-key-0123456789\n",
        )
    (tmp_path / ".env").write_text(text, encoding="utf-8")
    return tmp_path


def _run_compose(command: list[str], folder: Path, *arguments: str) -> subprocess.CompletedProcess:
    # Only the .env file may set variables, as on a server.
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in compose_variables() and not key.startswith("COMPOSE_")
    }
    return subprocess.run(
        [*command, "--profile", "gpu", "--profile", "train", *arguments],
        cwd=folder,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_compose_config_validates(tmp_path):
    command = _compose_command()
    folder = _compose_folder(tmp_path, fill_secrets=True)

    result = _run_compose(command, folder, "config")
    assert result.returncode == 0, result.stderr

    services = _run_compose(command, folder, "config", "--services")
    assert services.returncode == 0, services.stderr
    assert set(services.stdout.split()) == set(load_compose()["services"])


def test_compose_config_requires_secrets(tmp_path):
    command = _compose_command()
    folder = _compose_folder(tmp_path, fill_secrets=False)

    result = _run_compose(command, folder, "config")

    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr


# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return (instruction, arguments) pairs, with continuation lines joined."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def test_dockerfile_runs_as_non_root_user():
    instructions = dockerfile_instructions()
    final_stage_start = max(
        index for index, (keyword, _) in enumerate(instructions) if keyword == "FROM"
    )
    users = [
        arguments for keyword, arguments in instructions[final_stage_start:] if keyword == "USER"
    ]
    assert users, "the final stage sets no USER, so it runs as root"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_dockerfile_is_multi_stage():
    stages = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "FROM"]
    assert len(stages) >= 2
    assert "python:3.11-slim" in DOCKERFILE.read_text(encoding="utf-8")
    entrypoints = [
        arguments for keyword, arguments in dockerfile_instructions() if keyword == "ENTRYPOINT"
    ]
    assert json.loads(entrypoints[-1]) == ["mindharbor"]


def test_dockerfile_copies_no_env_file():
    for keyword, arguments in dockerfile_instructions():
        if keyword in {"COPY", "ADD"}:
            sources = [part for part in arguments.split() if not part.startswith("--")][:-1]
            for source in sources:
                assert ".env" not in source, f"{keyword} {arguments}"
                assert source not in {".", "./"}, f"{keyword} copies the whole build context"


def test_dockerfile_bakes_in_no_secret():
    names = secret_variables() | REQUIRED_SECRETS
    for keyword, arguments in dockerfile_instructions():
        if keyword in {"ENV", "ARG"}:
            for name in names:
                assert name not in arguments, f"{keyword} {arguments}"


def test_dockerignore_keeps_out_local_state():
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for pattern in (".env", "var/", ".venv/", ".git/", ".pytest_cache/", "models/"):
        assert pattern in patterns, pattern


# Grafana dashboard


def dashboard_expressions(dashboard: dict) -> list[str]:
    expressions = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expressions.append(target["expr"])
    return expressions


def metric_base_name(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in METRIC_NAMES:
            return name.removesuffix(suffix)
    return name


def test_dashboard_parses_with_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["schemaVersion"] >= 36
    variables = {item["name"]: item for item in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_uses_known_metrics():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    used = set()
    for expression in dashboard_expressions(dashboard):
        used |= {metric_base_name(name) for name in re.findall(r"\bmindharbor_\w+", expression)}
    assert used - METRIC_NAMES == set(), "unknown metric names"
    assert METRIC_NAMES - used == set(), "metrics without a panel"


def test_dashboard_metrics_defined_in_service():
    module = ROOT / "core" / "observability.py"
    package = ROOT / "core" / "observability"
    if module.is_file():
        source = module.read_text(encoding="utf-8")
    elif package.is_dir():
        source = "\n".join(path.read_text(encoding="utf-8") for path in package.rglob("*.py"))
    else:
        pytest.skip("core/observability does not exist")
    for name in sorted(METRIC_NAMES):
        # prometheus_client adds _total to a counter named without it.
        defined = f'"{name}"' in source or f'"{name.removesuffix("_total")}"' in source
        assert defined, f"{name} is not defined in core/observability"
