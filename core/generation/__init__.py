"""Generators: backends that turn chat messages into a reply (``local`` and ``openai``)."""

from __future__ import annotations

from core.config import GeneratorSettings, Secrets
from core.generation.base import Generator, SamplingParams


def create_generator(settings: GeneratorSettings, secrets: Secrets) -> Generator:
    """Build the configured generator; heavy imports happen only for the one in use."""
    if settings.backend == "local":
        from core.generation.local import LocalGenerator

        return LocalGenerator.from_settings(settings)

    from core.generation.openai_compat import OpenAICompatGenerator

    return OpenAICompatGenerator.from_settings(settings, secrets)


def sampling_from_settings(settings: GeneratorSettings) -> SamplingParams:
    sampling = settings.sampling
    return SamplingParams(
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        repetition_penalty=sampling.repetition_penalty,
        seed=sampling.seed,
    )
