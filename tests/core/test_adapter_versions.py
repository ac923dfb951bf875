"""Adapter versions: recording, exactly one promoted, and the local generator switching to a
newly promoted adapter while requests are in flight."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from sqlalchemy.exc import IntegrityError
from transformers import AutoModelForCausalLM

from core import adapter_versions
from core.config import (
    DatabaseSettings,
    GeneratorSettings,
    LocalGeneratorSettings,
    Secrets,
    Settings,
)
from core.generation.base import ChatMessage, SamplingParams
from core.generation.local import LocalGenerator
from core.service import Service
from core.storage import db
from core.storage.models import AdapterStatus, AdapterVersion
from tests.helpers.tiny_model import build_tiny_chat_model

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)
PROMPTS = [[ChatMessage("user", f"I could not sleep again, night {index}.")] for index in range(20)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model")


def make_adapter(base: Path, folder: Path, seed: int) -> Path:
    """Save a LoRA adapter with random A and B, so it changes the model's replies."""
    import torch

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    return make_adapter(tiny_model, folder / "v1", 1), make_adapter(tiny_model, folder / "v2", 2)


async def reply_texts(generator: LocalGenerator) -> list[str]:
    results = await asyncio.gather(*(generator.generate(prompt, GREEDY) for prompt in PROMPTS))
    return [result.text for result in results]


async def test_one_version_promoted(database_url: str, tmp_path: Path) -> None:
    engine = db.create_engine(DatabaseSettings(url=database_url))
    sessions = db.create_session_factory(engine)
    try:
        for version in ("v1", "v2", "v3"):
            await adapter_versions.record(
                sessions,
                version=version,
                path=tmp_path / version,
                base_model="embedded",
                data_manifest={"files": {}},
                recipe={"peft_config": {"r": 8}},
                metrics={"eval_loss_after": 2.5},
            )
        await adapter_versions.promote(sessions, "v1")
        await adapter_versions.promote(sessions, "v2", decision={"promote": True})
        await adapter_versions.reject(sessions, "v3", decision={"promote": False})

        versions = {row.version: row for row in await adapter_versions.list_versions(sessions)}
        assert versions["v1"].status == AdapterStatus.RETIRED
        assert versions["v2"].status == AdapterStatus.PROMOTED
        assert versions["v2"].decision == {"promote": True}
        assert versions["v2"].promoted_at is not None
        assert versions["v3"].status == AdapterStatus.REJECTED
        assert versions["v3"].recipe == {"peft_config": {"r": 8}}
        promoted = await adapter_versions.promoted(sessions)
        assert promoted is not None
        assert promoted.version == "v2"

        # The database itself rejects a second promoted row written past the registry.
        with pytest.raises(IntegrityError):
            async with sessions.begin() as session:
                row = await session.get(AdapterVersion, "v3")
                assert row is not None
                row.status = AdapterStatus.PROMOTED
        with pytest.raises(LookupError, match="adapters list"):
            await adapter_versions.promote(sessions, "v9")
    finally:
        await engine.dispose()


async def test_switch_during_concurrent_requests(
    tiny_model: Path, adapters: tuple[Path, Path]
) -> None:
    first, second = adapters
    async with LocalGenerator(model=tiny_model, adapter=second, device="cpu") as reference:
        expected_second = await reply_texts(reference)
    async with LocalGenerator(model=tiny_model, adapter=first, device="cpu") as reference:
        expected_first = await reply_texts(reference)
    assert expected_first != expected_second

    async with LocalGenerator(
        model=tiny_model, adapter=first, device="cpu", max_batch_size=4, batch_wait_ms=1
    ) as generator:
        pending = [asyncio.create_task(generator.generate(p, GREEDY)) for p in PROMPTS]
        await asyncio.sleep(0)
        await generator.switch_adapter(second, label="v2")
        results = await asyncio.gather(*pending)
        after = await reply_texts(generator)

    # Every request got a reply, from one adapter or the other and whole.
    assert len(results) == len(PROMPTS)
    models = {result.model for result in results}
    assert models <= {"model+v1", "model+v2"}
    for index, result in enumerate(results):
        expected = expected_first if result.model == "model+v1" else expected_second
        assert result.text == expected[index]
    # Requests after the switch are served by the new adapter alone.
    assert after == expected_second
    assert generator.stats.failed_batches == 0


async def test_broken_adapter_keeps_old_one(
    tiny_model: Path, adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    first, _ = adapters
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}", encoding="utf-8")

    async with LocalGenerator(model=tiny_model, adapter=first, device="cpu") as generator:
        before = await reply_texts(generator)
        with pytest.raises(Exception, match="keeps serving"):
            await generator.switch_adapter(broken)
        after = await reply_texts(generator)

    assert after == before
    assert generator.model_name == "model+v1"


async def test_service_follows_promoted_version(
    tiny_model: Path, adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    first, second = adapters
    settings = Settings(
        database=DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'serve.db'}"),
        generator=GeneratorSettings(
            backend="local",
            sampling={"max_new_tokens": 32},
            local=LocalGeneratorSettings(
                model=str(tiny_model), adapter="promoted", adapter_check_s=0.05, device="cpu"
            ),
        ),
    )
    async with Service(settings, Secrets()) as service:
        # Nothing promoted yet: the base model serves.
        assert service.generator.model_name == "model"
        sessions = db.create_session_factory(service.engine)
        for version, path in (("v1", first), ("v2", second)):
            await adapter_versions.record(
                sessions,
                version=version,
                path=path,
                base_model=str(tiny_model),
                data_manifest={},
                recipe={},
                metrics={},
            )
        await adapter_versions.promote(sessions, "v1")
        await wait_for_model(service, "model+v1")
        await adapter_versions.promote(sessions, "v2")
        await wait_for_model(service, "model+v2")
        reply = await service.generator.generate(PROMPTS[0], GREEDY)

    assert reply.model == "model+v2"


async def wait_for_model(service: Service, name: str) -> None:
    for _ in range(200):
        if service.generator.model_name == name:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the generator still serves {service.generator.model_name!r}")
