"""The ``openai`` generator: replies from an OpenAI-compatible chat-completions server over HTTP.

vLLM, SGLang, Text Generation Inference and Ollama all serve ``POST
{base_url}/chat/completions``. The generator sends the conversation there and
streams the reply when the caller wants deltas. Rate limits, server errors and
dropped connections are retried with backoff. When the server rejects the
prompt as longer than the model's context, one retry goes out with a shorter
history.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import enum
import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

import httpx

from core.config import GeneratorSettings, Secrets, resolve_path
from core.errors import (
    ConfigError,
    ContextLengthExceeded,
    GenerationError,
    GenerationTimeout,
    GeneratorUnavailable,
)
from core.generation.base import (
    ChatMessage,
    DeltaCallback,
    FinishReason,
    GenerationResult,
    Generator,
    SamplingParams,
)
from core.generation.chat_tokens import encode_chat
from core.generation.postprocess import CleanedReply, StreamGuard, clean_reply, defuse_markers

logger = logging.getLogger(__name__)

# Error text that means the prompt does not fit the model's context. vLLM writes
# "This model's maximum context length is 4096 tokens. However, your request has ...",
# and OpenAI sets the code "context_length_exceeded".
# NOTE: the other patterns are guesses at SGLang's and TGI's wording, not checked against
# their sources. A context error that matches none of them raises GeneratorUnavailable.
_CONTEXT_LENGTH_MESSAGE = re.compile(
    r"maximum context length"
    r"|context[ _]length[ _]exceeded"
    r"|longer than the model's context length"
    r"|exceeds? the (?:model'?s? )?(?:maximum )?context"
    r"|`inputs` tokens \+ `max_new_tokens`"
    r"|prompt is too long",
    re.IGNORECASE,
)
# vLLM responds with 400. Some servers and proxies use 413 or 422 for input that is too long.
_CONTEXT_LENGTH_STATUSES = frozenset({400, 413, 422})

# Server error text kept in exception messages, so a long HTML error page stays readable.
_MAX_ERROR_TEXT_CHARS = 300

# Exponents above this cannot change the delay, because backoff_max_s caps it long before.
_MAX_BACKOFF_EXPONENT = 32

# Token estimate used without a tokenizer (see _estimate_prompt_tokens).
_ESTIMATE_TOKENS_PER_MESSAGE = 6
_ESTIMATE_TOKENS_PER_PROMPT = 8
_ESTIMATE_ASCII_BYTES_PER_TOKEN = 3


class _State(enum.Enum):
    CREATED = "created"
    STARTED = "started"
    STOPPED = "stopped"


class _RetryableError(Exception):
    """A failure that a later attempt may not meet: HTTP 429, 5xx or a dropped connection.

    ``reason`` ("HTTP 503", "ConnectError") goes to logs; ``description`` adds the
    server's error text and goes only into exception messages.
    """

    def __init__(
        self,
        reason: str,
        description: str,
        *,
        status_code: int | None = None,
        retry_after_s: float | None = None,
        original: BaseException | None = None,
    ) -> None:
        super().__init__(description)
        self.reason = reason
        self.description = description
        self.status_code = status_code
        self.retry_after_s = retry_after_s
        self.original = original


class _ContextLengthError(Exception):
    """The server rejected the prompt as longer than the model's context."""

    def __init__(self, server_message: str, status_code: int) -> None:
        super().__init__(server_message)
        self.server_message = server_message
        self.status_code = status_code


@dataclass(slots=True)
class _RawReply:
    """Reply text as the server sent it, before clean-up."""

    text: str
    server_finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    streamed: bool


class OpenAICompatGenerator(Generator):
    """A generator that requests each reply from an OpenAI-compatible server.

    ``start`` opens the HTTP client and loads the optional tokenizer, and
    ``stop`` closes the client. ``generate`` may run concurrently from one event loop,
    because the HTTP client pools connections and the server batches.
    """

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        context_length: int,
        tokenizer: str | None = None,
        connect_timeout_s: float = 5.0,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 20.0,
        stop_markers: Sequence[str] = (),
        api_key: str | None = None,
    ) -> None:
        """Configure the generator. Nothing connects before ``start``.

        ``timeout_s`` bounds a whole ``generate`` call, including retries and
        the waits between them. ``connect_timeout_s`` bounds each TCP connect.
        ``max_retries`` counts retries after the first attempt.
        """
        try:
            url = httpx.URL(base_url)
        except httpx.InvalidURL:
            url = httpx.URL()
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(
                f"generator.openai.base_url must be an http:// or https:// URL such as "
                f"'http://127.0.0.1:8000/v1'; got {base_url!r}."
            )
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ConfigError(
                f"Timeouts must be positive; got timeout_s={timeout_s!r}, "
                f"connect_timeout_s={connect_timeout_s!r}."
            )
        if max_retries < 0 or backoff_base_s < 0 or backoff_max_s < 0:
            raise ConfigError(
                f"max_retries, backoff_base_s and backoff_max_s must not be negative; got "
                f"{max_retries!r}, {backoff_base_s!r}, {backoff_max_s!r}."
            )

        self._base_url = base_url.rstrip("/")
        self._completions_url = f"{self._base_url}/chat/completions"
        # The base URL as logs show it, without any user:password part.
        self._display_url = str(url.copy_with(username=None, password=None)).rstrip("/")
        self._model = model
        self._context_length = context_length
        self._tokenizer_path = tokenizer
        self._connect_timeout_s = connect_timeout_s
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._stop_markers = [marker for marker in stop_markers if marker]
        self._api_key = api_key

        self._state = _State.CREATED
        self._client: httpx.AsyncClient | None = None
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: GeneratorSettings, secrets: Secrets) -> OpenAICompatGenerator:
        """Build the generator from the ``generator`` settings and MINDHARBOR_OPENAI_API_KEY."""
        openai = settings.openai
        api_key = secrets.openai_api_key.get_secret_value() if secrets.openai_api_key else None
        return cls(
            base_url=openai.base_url,
            model=openai.model,
            context_length=openai.context_length,
            tokenizer=str(resolve_path(openai.tokenizer)) if openai.tokenizer else None,
            connect_timeout_s=openai.connect_timeout_s,
            timeout_s=settings.timeout_s,
            max_retries=openai.max_retries,
            backoff_base_s=openai.backoff_base_s,
            backoff_max_s=openai.backoff_max_s,
            stop_markers=settings.stop_markers,
            api_key=api_key or None,
        )

    # Properties

    @property
    def model_name(self) -> str:
        return self._model

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def is_ready(self) -> bool:
        # NOTE: started means the HTTP client is open. Whether the inference server
        # responds shows in mindharbor_generation_errors_total, not here.
        return self._state is _State.STARTED

    # Lifecycle

    async def start(self) -> None:
        """Open the HTTP client and load the tokenizer, if one is configured."""
        if self._state is _State.STARTED:
            logger.debug("OpenAI-compatible generator for %s is already started", self._display_url)
            return

        if self._tokenizer_path is not None:
            # Loading reads files and builds a Rust tokenizer, so keep it off the event loop.
            await asyncio.to_thread(self._load_tokenizer)

        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers,
            # A per-read limit. generate() also applies timeout_s to the whole call.
            timeout=httpx.Timeout(self._timeout_s, connect=self._connect_timeout_s),
        )
        self._state = _State.STARTED
        logger.info(
            "OpenAI-compatible generator started: base_url=%s model=%r",
            self._display_url,
            self._model,
        )

    async def stop(self) -> None:
        """Close the HTTP client. A later ``start`` opens a new one."""
        if self._state is not _State.STARTED:
            return
        client, self._client = self._client, None
        self._state = _State.STOPPED
        if client is not None:
            await client.aclose()
        logger.info("OpenAI-compatible generator stopped: base_url=%s", self._display_url)

    def _require_client(self) -> httpx.AsyncClient:
        if self._state is not _State.STARTED or self._client is None:
            # GeneratorUnavailable, like the local generator, so that callers catching
            # GenerationError send the user a fallback message instead of crashing.
            raise GeneratorUnavailable(
                f"OpenAICompatGenerator is not started (state: {self._state.value}): call "
                "`await generator.start()` or use `async with generator:` before generate()."
            )
        return self._client

    # Prompt tokens

    def count_prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Count prompt tokens with the configured tokenizer, or estimate them without one."""
        if self._tokenizer_path is None:
            return _estimate_prompt_tokens(messages)
        tokenizer = self._load_tokenizer()
        return len(encode_chat(tokenizer, messages))

    def _load_tokenizer(self) -> Any:
        """Load the tokenizer folder once, from local files only."""
        with self._tokenizer_lock:
            if self._tokenizer is not None:
                return self._tokenizer

            # Imported here so a service that never counts with a tokenizer skips the import cost.
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(
                    self._tokenizer_path, local_files_only=True
                )
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"generator.openai.tokenizer {self._tokenizer_path!r} could not be loaded as a "
                    f"Hugging Face tokenizer folder: {exc}. Point it at the served model's "
                    "tokenizer folder, or set it to null to size prompts with an estimate."
                ) from exc
            return self._tokenizer

    # Generation

    async def generate(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        *,
        on_delta: DeltaCallback | None = None,
    ) -> GenerationResult:
        """Request a reply, streaming it to ``on_delta`` when given.

        Raises GenerationTimeout when no reply is finished within ``timeout_s``,
        ContextLengthExceeded when even the shortened history does not fit, and
        GeneratorUnavailable when the server keeps failing or rejects the request.
        A stream that breaks after deltas were sent is not retried, so the user
        never sees a reply twice.
        """
        client = self._require_client()
        started_at = time.monotonic()
        attempts = _AttemptLog()

        try:
            async with asyncio.timeout(self._timeout_s):
                raw, sent_messages = await self._generate_with_retries(
                    client, messages, params, on_delta, attempts
                )
        except GenerationError:
            raise
        except TimeoutError as exc:
            raise GenerationTimeout(
                f"No reply from model {self._model!r} at {self._display_url} within "
                f"{self._timeout_s:g} s (generator.timeout_s) after {attempts.retries} "
                f"retries; {attempts.describe_last_failure()}.",
                original=exc,
            ) from exc

        cleaned = clean_reply(raw.text, self._stop_markers)
        finish_reason = _finish_reason(raw.server_finish_reason, cleaned)
        details: dict[str, object] = {
            "retries": attempts.retries,
            "history_shortened": attempts.history_shortened,
            "streamed": raw.streamed,
            "server_finish_reason": raw.server_finish_reason,
        }
        if attempts.history_shortened:
            details["dropped_messages"] = len(messages) - len(sent_messages)
        if cleaned.cut_at_marker or cleaned.repetition_trimmed:
            details["trimmed_chars"] = len(raw.text.strip()) - len(cleaned.text)

        elapsed_s = time.monotonic() - started_at
        logger.info(
            "Reply from model %r: finish_reason=%s prompt_tokens=%s completion_tokens=%s "
            "retries=%d history_shortened=%s in %.2f s",
            self._model,
            finish_reason.value,
            raw.prompt_tokens,
            raw.completion_tokens,
            attempts.retries,
            attempts.history_shortened,
            elapsed_s,
        )
        return GenerationResult(
            text=cleaned.text,
            finish_reason=finish_reason,
            model=self._model,
            prompt_tokens=raw.prompt_tokens,
            completion_tokens=raw.completion_tokens,
            details=details,
        )

    async def _generate_with_retries(
        self,
        client: httpx.AsyncClient,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        on_delta: DeltaCallback | None,
        attempts: _AttemptLog,
    ) -> tuple[_RawReply, list[ChatMessage]]:
        """Send the request until it succeeds, retrying as the class docstring describes.

        Returns the reply and the messages of the request that produced it.
        """
        # Defuse once, so the shortened history below is defused too.
        current = [_defuse_user_message(message) for message in messages]

        while True:
            payload = self._build_payload(current, params, stream=on_delta is not None)
            try:
                if on_delta is None:
                    raw = await self._post(client, payload)
                else:
                    raw = await self._post_streaming(client, payload, on_delta)
                return raw, current

            except _RetryableError as failure:
                attempts.last_failure = failure
                if attempts.retries >= self._max_retries:
                    raise GeneratorUnavailable(
                        f"Model {self._model!r} at {self._display_url} still failed after "
                        f"{attempts.retries} retries (generator.openai.max_retries): "
                        f"{failure.description}.",
                        status_code=failure.status_code,
                        original=failure.original,
                    ) from failure.original
                delay_s = self._retry_delay(failure, attempts.retries)
                attempts.retries += 1
                logger.warning(
                    "Generation request to %s failed with %s; retry %d of %d in %.2f s",
                    self._display_url,
                    failure.reason,
                    attempts.retries,
                    self._max_retries,
                    delay_s,
                )
                await asyncio.sleep(delay_s)

            except _ContextLengthError as failure:
                shorter = None if attempts.history_shortened else shorten_history(current)
                if shorter is None:
                    raise ContextLengthExceeded(
                        f"Model {self._model!r} at {self._display_url} rejected a prompt of "
                        f"{len(current)} messages as longer than its context (HTTP "
                        f"{failure.status_code}: {failure.server_message})."
                    ) from None
                logger.warning(
                    "Prompt of %d messages exceeds the context of model %r (HTTP %d); "
                    "retrying with %d messages",
                    len(current),
                    self._model,
                    failure.status_code,
                    len(shorter),
                )
                attempts.history_shortened = True
                current = shorter

    def _build_payload(
        self, messages: Sequence[ChatMessage], params: SamplingParams, *, stream: bool
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self._model,
            "messages": [
                {"role": message.role, "content": message.content} for message in messages
            ],
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            payload["seed"] = params.seed
        if params.repetition_penalty != 1.0:
            # Not part of the OpenAI API, but vLLM reads it as an extra sampling parameter.
            # Set generator.sampling.repetition_penalty to 1.0 for a server that rejects
            # unknown fields.
            payload["repetition_penalty"] = params.repetition_penalty
        if stream:
            payload["stream"] = True
            # Requests a final chunk with token usage, which OpenAI and vLLM send.
            payload["stream_options"] = {"include_usage": True}
        return payload

    def _retry_delay(self, failure: _RetryableError, retry_index: int) -> float:
        """Return the seconds to wait before the next attempt.

        A Retry-After header wins, capped at backoff_max_s. Without one the wait
        grows exponentially from backoff_base_s, with jitter.
        """
        if failure.retry_after_s is not None:
            return min(failure.retry_after_s, self._backoff_max_s)
        ceiling = min(
            self._backoff_max_s,
            self._backoff_base_s * 2 ** min(retry_index, _MAX_BACKOFF_EXPONENT),
        )
        # Jitter keeps clients that failed together from retrying together.
        return ceiling * random.uniform(0.5, 1.0)

    # One HTTP request

    async def _post(self, client: httpx.AsyncClient, payload: dict[str, Any]) -> _RawReply:
        try:
            response = await client.post(self._completions_url, json=payload)
        except httpx.TransportError as exc:
            _raise_for_transport_error(exc)

        if not response.is_success:
            _raise_for_error_response(response)
        return _parse_completion(response)

    async def _post_streaming(
        self, client: httpx.AsyncClient, payload: dict[str, Any], on_delta: DeltaCallback
    ) -> _RawReply:
        guard = StreamGuard(self._stop_markers)
        progress = _StreamProgress()
        try:
            async with client.stream(
                "POST",
                self._completions_url,
                json=payload,
                headers={"Accept": "text/event-stream"},
            ) as response:
                if not response.is_success:
                    await response.aread()
                    _raise_for_error_response(response)
                return await _read_event_stream(response, guard, on_delta, progress)
        except httpx.TransportError as exc:
            if progress.deltas_sent and not isinstance(exc, httpx.TimeoutException):
                # Retrying would send the user the start of the reply a second time.
                raise GeneratorUnavailable(
                    f"The reply stream from {self._display_url} broke after part of the reply "
                    f"was sent: {type(exc).__name__}: {exc}",
                    original=exc,
                ) from exc
            _raise_for_transport_error(exc)


@dataclass(slots=True)
class _AttemptLog:
    """Retry count, history shortening and last retryable failure of one ``generate`` call."""

    retries: int = 0
    history_shortened: bool = False
    last_failure: _RetryableError | None = None

    def describe_last_failure(self) -> str:
        if self.last_failure is None:
            return "no request failed before the timeout"
        return f"the last failed attempt got {self.last_failure.description}"


@dataclass(slots=True)
class _StreamProgress:
    deltas_sent: bool = False


def _defuse_user_message(message: ChatMessage) -> ChatMessage:
    if message.role != "user":
        return message
    return ChatMessage(role=message.role, content=defuse_markers(message.content))


def _finish_reason(server_reason: str | None, cleaned: CleanedReply) -> FinishReason:
    """Map the server's finish_reason, letting reply clean-up take precedence."""
    if cleaned.cut_at_marker:
        return FinishReason.MARKER
    if cleaned.repetition_trimmed:
        return FinishReason.REPETITION
    if server_reason == "length":
        return FinishReason.LENGTH
    return FinishReason.STOP


# History shortening


def shorten_history(messages: Sequence[ChatMessage]) -> list[ChatMessage] | None:
    """Drop the oldest half of the turns between the system messages and the newest user message.

    Leading system messages and everything from the newest user message on are
    kept. The kept turns start with a user turn, so the roles still alternate.
    Returns None when nothing can be dropped.
    """
    head_size = 0
    while head_size < len(messages) and messages[head_size].role == "system":
        head_size += 1

    newest_user = max(
        (index for index, message in enumerate(messages) if message.role == "user"),
        default=None,
    )
    if newest_user is None or newest_user < head_size:
        return None

    between = list(messages[head_size:newest_user])
    if not between:
        return None
    kept = between[(len(between) + 1) // 2 :]
    while kept and kept[0].role != "user":
        kept.pop(0)
    return [*messages[:head_size], *kept, *messages[newest_user:]]


# Prompt size without a tokenizer


def _estimate_prompt_tokens(messages: Sequence[ChatMessage]) -> int:
    """Estimate the prompt's token count, erring high.

    NOTE: an estimate, not a count. Every non-ASCII character (CJK included) counts
    as one token and ASCII text as one token per 3 bytes. ChatGLM3's and Llama's
    tokenizers need fewer for Chinese and English prose, but a tokenizer that splits
    rare characters into bytes can need more. Configure generator.openai.tokenizer
    for exact counts.
    """
    total = _ESTIMATE_TOKENS_PER_PROMPT
    for message in messages:
        non_ascii = sum(1 for character in message.content if ord(character) > 0x7F)
        ascii_bytes = len(message.content) - non_ascii
        total += _ESTIMATE_TOKENS_PER_MESSAGE + non_ascii
        total += math.ceil(ascii_bytes / _ESTIMATE_ASCII_BYTES_PER_TOKEN)
    return total


# Responses and errors


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Return the wait in seconds that a Retry-After header requests, or None if it is invalid.

    The header contains either delta-seconds or an HTTP date. Fractional seconds are
    accepted too, although HTTP allows only whole ones. A date in the past gives 0.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _read_error(response: httpx.Response) -> tuple[str, str | None]:
    """Return the server's error message and error code from an error response body.

    Handles the OpenAI shape ``{"error": {"message", "type", "code"}}``, vLLM's
    older top-level ``{"message", "code"}`` and TGI's ``{"error": "..."}``.
    """
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _server_text(response.text.strip()) or response.reason_phrase, None
    return _error_fields(body)


def _error_fields(body: object) -> tuple[str, str | None]:
    if not isinstance(body, dict):
        return _server_text(str(body)), None
    error = body.get("error", body)
    if isinstance(error, str):
        return _server_text(error), None
    if not isinstance(error, dict):
        return _server_text(str(error)), None
    message = _server_text(str(error.get("message") or error.get("detail") or ""))
    code = error.get("code")
    return message, None if code is None else str(code)


def _server_text(text: str) -> str:
    """Shorten a server's error text, withholding validation errors that quote the request.

    Pydantic-based servers (vLLM, SGLang) answer an invalid request with the
    validation error, which repeats part of the offending input, and the input
    here is a conversation.
    """
    if "validation error" in text.lower() or "input_value=" in text or "'input':" in text:
        return "request validation failed (the server's text is withheld: it quotes the request)"
    return text[:_MAX_ERROR_TEXT_CHARS]


def _is_context_length_error(message: str, code: str | None) -> bool:
    return code == "context_length_exceeded" or bool(_CONTEXT_LENGTH_MESSAGE.search(message))


def _raise_for_error_response(response: httpx.Response) -> NoReturn:
    """Raise the error that an unsuccessful response calls for."""
    status = response.status_code
    message, code = _read_error(response)

    if status == 429:
        raise _RetryableError(
            "HTTP 429",
            f"HTTP 429 {message}".rstrip(),
            status_code=status,
            retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
        )
    if status >= 500:
        raise _RetryableError(
            f"HTTP {status}", f"HTTP {status} {message}".rstrip(), status_code=status
        )
    if status in _CONTEXT_LENGTH_STATUSES and _is_context_length_error(message, code):
        raise _ContextLengthError(message, status)
    raise GeneratorUnavailable(
        f"The server at {response.request.url} rejected the request with HTTP {status}: "
        f"{message or response.reason_phrase}. Check generator.openai.base_url and "
        "generator.openai.model, and MINDHARBOR_OPENAI_API_KEY if the server needs a key.",
        status_code=status,
    )


def _raise_for_transport_error(exc: httpx.TransportError) -> NoReturn:
    """Raise GenerationTimeout for a read, write or pool timeout, else a retryable error."""
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        # These limits equal timeout_s, so the whole call is out of time too.
        raise GenerationTimeout(
            f"The request to {exc.request.url} timed out ({type(exc).__name__}).",
            original=exc,
        ) from exc
    raise _RetryableError(type(exc).__name__, f"{type(exc).__name__}: {exc}", original=exc) from exc


def _parse_completion(response: httpx.Response) -> _RawReply:
    try:
        body = response.json()
        choice = body["choices"][0]
        content = choice["message"].get("content") or ""
        finish = choice.get("finish_reason")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        # ValueError covers json.JSONDecodeError and UnicodeDecodeError.
        raise GeneratorUnavailable(
            f"The server at {response.request.url} returned HTTP {response.status_code} without "
            f"a chat completion (expected choices[0].message.content): {type(exc).__name__}: {exc}",
            status_code=response.status_code,
            original=exc,
        ) from exc
    prompt_tokens, completion_tokens = _usage(body.get("usage"))
    return _RawReply(
        text=str(content),
        server_finish_reason=finish,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        streamed=False,
    )


def _usage(usage: object) -> tuple[int | None, int | None]:
    if not isinstance(usage, dict):
        return None, None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    return (
        prompt if isinstance(prompt, int) else None,
        completion if isinstance(completion, int) else None,
    )


# Server-sent events


async def _iter_sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """Yield the data of each server-sent event, joining multi-line data with newlines."""
    data_lines: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data_lines:
                yield "\n".join(data_lines)
                data_lines = []
            continue
        if line.startswith(":"):
            continue  # a comment, which servers send to keep the connection open
        field_name, _, value = line.partition(":")
        if field_name == "data":
            data_lines.append(value.removeprefix(" "))
        # "event", "id" and "retry" fields carry nothing a chat completion needs.
    if data_lines:
        yield "\n".join(data_lines)


async def _read_event_stream(
    response: httpx.Response,
    guard: StreamGuard,
    on_delta: DeltaCallback,
    progress: _StreamProgress,
) -> _RawReply:
    """Read ``chat.completion.chunk`` events until ``[DONE]``, the end, or a chat-role marker."""
    parts: list[str] = []
    finish: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    # aclosing ends the line iterator before the response closes, also after a break.
    async with contextlib.aclosing(_iter_sse_data(response)) as events:
        async for data in events:
            if data.strip() == "[DONE]":
                break
            chunk = _parse_chunk(data, response, progress)

            if chunk.get("usage"):
                prompt_tokens, completion_tokens = _usage(chunk["usage"])
            choices = chunk.get("choices") or []
            if not choices:
                continue
            choice = choices[0]
            content = (choice.get("delta") or {}).get("content")
            if content:
                parts.append(content)
                piece = guard.feed(content)
                if piece:
                    progress.deltas_sent = True
                    await on_delta(piece)
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
            if guard.stopped:
                # Leaving the stream closes the connection, so the server can stop generating.
                break

    rest = guard.flush()
    if rest:
        progress.deltas_sent = True
        await on_delta(rest)
    return _RawReply(
        text="".join(parts),
        server_finish_reason=finish,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        streamed=True,
    )


def _parse_chunk(data: str, response: httpx.Response, progress: _StreamProgress) -> dict[str, Any]:
    """Decode one event, raising the matching error for an error event in the stream."""
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError as exc:
        raise GeneratorUnavailable(
            f"The reply stream from {response.request.url} contained an event that is not JSON: "
            f"{exc}",
            original=exc,
        ) from exc
    if not isinstance(chunk, dict):
        raise GeneratorUnavailable(
            f"The reply stream from {response.request.url} contained an event that is not a "
            f"JSON object: {type(chunk).__name__}"
        )

    if "error" in chunk:
        # vLLM reports failures that happen after the 200 status as an error event.
        message, code = _error_fields(chunk)
        if not progress.deltas_sent and _is_context_length_error(message, code):
            raise _ContextLengthError(message, response.status_code)
        raise GeneratorUnavailable(
            f"The reply stream from {response.request.url} ended with an error: {message}"
        )
    return chunk
