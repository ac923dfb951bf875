"""The ``local`` generator: a transformers model, with an optional peft LoRA adapter, run in this
process on CPU or CUDA, with a micro-batcher for concurrent requests and token streaming.

Concurrent ``generate`` calls are queued. One worker task takes the first request, waits up to
``batch_wait_ms`` for others with the same sampling parameters, and runs ``model.generate`` once
for the whole left-padded batch in a worker thread. Only one ``model.generate`` runs at a time.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import enum
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, StopStringCriteria
from transformers.generation.streamers import BaseStreamer

from core.config import GeneratorSettings, resolve_path
from core.errors import ConfigError, ContextLengthExceeded, GenerationError, GeneratorUnavailable
from core.generation import embedded
from core.generation.base import (
    ChatMessage,
    DeltaCallback,
    FinishReason,
    GenerationResult,
    Generator,
    SamplingParams,
)
from core.generation.chat_tokens import encode_chat
from core.generation.postprocess import StreamGuard, clean_reply

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"

# Decode options shared by streaming and the final text. Clean-up of tokenization spaces is off
# because it could rewrite text that was already streamed.
_DECODE_KWARGS: dict[str, Any] = {
    "skip_special_tokens": True,
    "clean_up_tokenization_spaces": False,
}

# A byte-level tokenizer decodes a character whose bytes are not all generated yet as U+FFFD.
_INCOMPLETE_CHAR = "\ufffd"


class GeneratorState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(slots=True)
class BatcherStats:
    """Counters of the micro-batcher, read by tests and benchmarks."""

    batches: int = 0
    requests: int = 0
    failed_batches: int = 0
    # Requests dropped before their batch started because their caller was cancelled.
    skipped_cancelled: int = 0
    # Batch size -> number of batches of that size.
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)

    @property
    def max_batch_size(self) -> int:
        return max(self.batch_sizes, default=0)


@dataclass(eq=False, slots=True)
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    future: asyncio.Future[GenerationResult]
    # Reply text for the caller's ``on_delta``, ended by None. None when the caller does not stream.
    deltas: asyncio.Queue[str | None] | None
    # Set on the event loop when the caller stops waiting, and read by the generate thread.
    abandoned: bool = False


@dataclass(slots=True)
class _RowOutput:
    text: str
    finish_reason: FinishReason
    completion_tokens: int
    # Final text not streamed yet. Empty when the row does not stream or its stream diverged.
    stream_tail: str = ""
    stream_diverged: bool = False


@dataclass(slots=True)
class _LoadedModel:
    model: Any
    tokenizer: Any
    device: torch.device
    context_length: int
    pad_token_id: int
    # Token ids that end a reply: eos ids plus the tokenizer's chat-role marker tokens.
    end_token_ids: list[int]
    generation_config: Any
    stop_string_criteria: StopStringCriteria | None


# Queue sentinel that makes the worker finish the queued requests and exit.
_STOP = object()


class LocalGenerator(Generator):
    """Generate replies with a transformers causal LM (plus an optional LoRA adapter) in process.

    ``model`` is ``"embedded"`` (SmolLM2-135M-Instruct, converted once under ``models_dir``), a
    Hugging Face model folder or a ``.gguf`` file. ``adapter`` is a peft LoRA adapter folder.
    """

    name = "local"

    def __init__(
        self,
        *,
        model: str | Path = EMBEDDED,
        adapter: str | Path | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 16,
        batch_wait_ms: float = 5.0,
        stop_markers: Sequence[str] = (),
        models_dir: str | Path = "var/models",
        context_length: int | None = None,
    ) -> None:
        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"`device` must be 'auto', 'cpu' or 'cuda'; got {device!r}.")
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(
                f"`dtype` must be 'auto', 'float32', 'bfloat16' or 'float16'; got {dtype!r}."
            )
        if max_batch_size < 1:
            raise ConfigError(f"`max_batch_size` must be at least 1; got {max_batch_size!r}.")
        if batch_wait_ms < 0:
            raise ConfigError(f"`batch_wait_ms` must not be negative; got {batch_wait_ms!r}.")
        if context_length is not None and context_length < 2:
            raise ConfigError(f"`context_length` must be at least 2; got {context_length!r}.")

        self._model_source = str(model)
        self._adapter = Path(adapter) if adapter is not None else None
        # The native conversion of a ChatGLM3 model folder, once converted.
        self._native_base: Path | None = None
        # Shown in the model name instead of the adapter folder's name when set.
        self._adapter_label: str | None = None
        self._device_setting = device
        self._dtype_setting = dtype
        self._max_batch_size = max_batch_size
        self._batch_wait_s = batch_wait_ms / 1000
        self._stop_markers = [marker for marker in stop_markers if marker]
        self._models_dir = Path(models_dir)
        self._context_length_override = context_length

        self._state = GeneratorState.CREATED
        self._lifecycle_lock = asyncio.Lock()
        self._loaded: _LoadedModel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        # Requests taken from the queue whose sampling parameters differed from their batch's.
        self._held: collections.deque[_Request] = collections.deque()
        self._worker: asyncio.Task[None] | None = None
        # Held while a batch generates and while the adapter is switched, never both at once.
        self._model_lock = asyncio.Lock()
        self.stats = BatcherStats()

    @classmethod
    def from_settings(
        cls, settings: GeneratorSettings, *, context_length: int | None = None
    ) -> LocalGenerator:
        """Create a generator from the ``generator`` settings, resolving relative paths against
        the project root."""
        local = settings.local
        model: str | Path = local.model if local.model == EMBEDDED else resolve_path(local.model)
        return cls(
            model=model,
            adapter=resolve_path(local.adapter) if local.adapter else None,
            device=local.device,
            dtype=local.dtype,
            max_batch_size=local.max_batch_size,
            batch_wait_ms=local.batch_wait_ms,
            stop_markers=settings.stop_markers,
            models_dir=resolve_path(local.models_dir),
            context_length=context_length,
        )

    # properties

    @property
    def state(self) -> GeneratorState:
        return self._state

    @property
    def is_ready(self) -> bool:
        return self._state is GeneratorState.RUNNING

    @property
    def serves_embedded_model(self) -> bool:
        """Whether this generator runs the embedded smoke-test model."""
        return self._model_source == EMBEDDED

    @property
    def model_name(self) -> str:
        if self._model_source == EMBEDDED:
            base = embedded.MODEL_DIR_NAME
        else:
            base = Path(self._model_source).name
        if self._adapter is None:
            return base
        return f"{base}+{self._adapter_label or self._adapter.name}"

    @property
    def adapter_label(self) -> str | None:
        """The adapter's name in ``model_name``, such as its version; the folder name if None."""
        return self._adapter_label

    @adapter_label.setter
    def adapter_label(self, label: str | None) -> None:
        self._adapter_label = label

    @property
    def context_length(self) -> int:
        if self._context_length_override is not None:
            return self._context_length_override
        return self._require_loaded().context_length

    @property
    def model(self) -> Any:
        """The loaded model (a ``PeftModel`` when an adapter is set)."""
        return self._require_loaded().model

    @property
    def tokenizer(self) -> Any:
        return self._require_loaded().tokenizer

    @property
    def device(self) -> torch.device:
        return self._require_loaded().device

    def count_prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return len(encode_chat(self._require_loaded().tokenizer, messages))

    # lifecycle

    async def start(self) -> None:
        async with self._lifecycle_lock:
            if self._state is GeneratorState.RUNNING:
                logger.debug("LocalGenerator %r is already running", self.model_name)
                return

            self._state = GeneratorState.STARTING
            logger.info("Loading local model %r", self.model_name)
            started = time.perf_counter()
            try:
                self._loaded = await asyncio.to_thread(self._load)
            except BaseException:
                self._state = GeneratorState.CREATED
                raise

            self._loop = asyncio.get_running_loop()
            self._queue = asyncio.Queue()
            self._model_lock = asyncio.Lock()
            self._held.clear()
            self._worker = asyncio.create_task(self._run_batcher(), name="LocalGenerator:batcher")
            self._state = GeneratorState.RUNNING
            logger.info(
                "Local model %r loaded on %s as %s in %.1f s (context %d tokens)",
                self.model_name,
                self._loaded.device,
                self._loaded.model.dtype,
                time.perf_counter() - started,
                self.context_length,
            )

    async def stop(self) -> None:
        """Finish every request accepted so far, then stop the worker and release the model."""
        async with self._lifecycle_lock:
            if self._state is not GeneratorState.RUNNING:
                logger.debug(
                    "LocalGenerator %r is not running (%s)", self.model_name, self._state.value
                )
                return

            self._state = GeneratorState.STOPPING
            self._queue.put_nowait(_STOP)
            if self._worker is not None:
                await self._worker
            self._worker = None

            on_cuda = self._loaded is not None and self._loaded.device.type == "cuda"
            self._loaded = None
            if on_cuda:
                torch.cuda.empty_cache()
            self._state = GeneratorState.STOPPED
            logger.info("Local model %r stopped", self.model_name)

    def _require_loaded(self) -> _LoadedModel:
        if self._loaded is None or self._state is not GeneratorState.RUNNING:
            raise GeneratorUnavailable(
                f"LocalGenerator {self.model_name!r} is not running (state "
                f"{self._state.value!r}); call `await generator.start()` first."
            )
        return self._loaded

    # loading (runs in a worker thread)

    def _load(self) -> _LoadedModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        device = self._pick_device()
        dtype = self._pick_dtype(device)
        source, load_kwargs = self._locate_model()

        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, **load_kwargs)
            if "gguf_file" in load_kwargs:
                # Dequantize to a dense model, which peft adapters and every device support.
                load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, local_files_only=True, **load_kwargs
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise GeneratorUnavailable(
                f"Failed to load the model {self._model_source!r}: {exc}", original=exc
            ) from exc

        if not tokenizer.chat_template:
            raise ConfigError(
                f"The tokenizer of model {self._model_source!r} has no chat template; "
                "the local generator needs one to build prompts."
            )
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ConfigError(
                    f"The tokenizer of model {self._model_source!r} has neither a pad nor an eos "
                    "token; set one in its tokenizer_config.json."
                )
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"

        generation_config = copy.deepcopy(model.generation_config)
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if self._context_length_override is None and not max_positions:
            raise ConfigError(
                f"The config of model {self._model_source!r} has no `max_position_embeddings`; "
                "pass `context_length` to the LocalGenerator."
            )

        if self._adapter is not None:
            model = self._load_adapter(model)
        model.to(device)
        model.eval()

        end_token_ids = self._collect_end_token_ids(tokenizer, generation_config)
        stop_string_criteria = None
        if self._stop_markers:
            # Ends a row as soon as its text spells a marker out of ordinary tokens.
            stop_string_criteria = StopStringCriteria(tokenizer, self._stop_markers)

        return _LoadedModel(
            model=model,
            tokenizer=tokenizer,
            device=device,
            context_length=self._context_length_override or int(max_positions),
            pad_token_id=int(tokenizer.pad_token_id),
            end_token_ids=end_token_ids,
            generation_config=generation_config,
            stop_string_criteria=stop_string_criteria,
        )

    def _pick_device(self) -> torch.device:
        # NOTE: the test suite runs on CPU only, so the CUDA branches here and in `stop` have
        # not been exercised by it.
        cuda_available = torch.cuda.is_available()
        if self._device_setting == "cuda" and not cuda_available:
            raise ConfigError(
                f"`device` is 'cuda' but CUDA is not available to torch {torch.__version__}; "
                "set it to 'auto' or 'cpu'."
            )
        if self._device_setting == "cpu" or not cuda_available:
            return torch.device("cpu")
        return torch.device("cuda")

    def _pick_dtype(self, device: torch.device) -> torch.dtype:
        if self._dtype_setting != "auto":
            return getattr(torch, self._dtype_setting)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # CPUs without bfloat16 matrix instructions multiply float32 matrices faster.
        return torch.float32

    def _locate_model(self) -> tuple[Path, dict[str, Any]]:
        if self._model_source == EMBEDDED:
            return embedded.ensure_embedded_model(self._models_dir), {}

        path = Path(self._model_source)
        if path.is_file() and path.suffix.lower() == ".gguf":
            return path.parent, {"gguf_file": path.name}
        if path.is_dir() and (path / "config.json").is_file():
            if _model_type(path) == "chatglm":
                # NOTE: the converter lives in training/, so this core module imports upward here.
                from training.chatglm3 import ConversionError, ensure_native_checkpoint

                try:
                    native = ensure_native_checkpoint(path, self._models_dir)
                except ConversionError as exc:
                    raise ConfigError(f"Model {self._model_source!r}: {exc}") from exc
                self._native_base = native
                return native, {}
            return path, {}
        raise ConfigError(
            f"Model {self._model_source!r} not found: set `generator.local.model` to "
            "'embedded', a Hugging Face model folder (with config.json) or a .gguf file."
        )

    def _load_adapter(self, model: Any) -> Any:
        from peft import PeftModel

        assert self._adapter is not None
        if not (self._adapter / "adapter_config.json").is_file():
            raise ConfigError(
                f"Adapter {str(self._adapter)!r} not found: `generator.local.adapter` must be a "
                "peft adapter folder containing adapter_config.json."
            )
        adapter = self._adapter
        if self._native_base is not None:
            from training.chatglm3 import ensure_native_adapter, is_chatglm3_adapter

            if is_chatglm3_adapter(adapter):
                adapter = ensure_native_adapter(adapter, self._native_base, self._models_dir)
        try:
            return PeftModel.from_pretrained(model, adapter, is_trainable=False)
        except (OSError, ValueError, RuntimeError) as exc:
            raise GeneratorUnavailable(
                f"Failed to load the adapter {str(self._adapter)!r} onto model "
                f"{self._model_source!r}: {exc}",
                original=exc,
            ) from exc

    def _collect_end_token_ids(self, tokenizer: Any, generation_config: Any) -> list[int]:
        end_ids: list[int] = []
        configured = generation_config.eos_token_id
        if isinstance(configured, int):
            end_ids.append(configured)
        elif configured:
            end_ids.extend(int(token_id) for token_id in configured)
        if tokenizer.eos_token_id is not None:
            end_ids.append(int(tokenizer.eos_token_id))

        # Chat-role markers that the tokenizer has as single added tokens (<|im_start|>,
        # <|user|>...) end the reply like eos does, because the model has begun another turn.
        added_vocab = tokenizer.get_added_vocab()
        for marker in self._stop_markers:
            if marker in added_vocab:
                end_ids.append(int(added_vocab[marker]))
        return sorted(set(end_ids))

    # adapter switching

    async def switch_adapter(self, adapter: str | Path, *, label: str | None = None) -> None:
        """Serve replies with another LoRA adapter from the next batch on, without a restart.

        The batch that is generating finishes with the adapter it started with. Queued requests
        wait for the switch and are then served with the new one. If the new adapter cannot be
        loaded, GeneratorUnavailable is raised and the old one keeps serving.
        """
        loaded = self._require_loaded()
        path = Path(adapter)
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(
                f"Adapter {str(path)!r} not found: a peft adapter folder contains "
                "adapter_config.json."
            )
        async with self._model_lock:
            started = time.perf_counter()
            loaded.model = await asyncio.to_thread(self._swap_adapter, loaded.model, path)
            previous = self.model_name
            self._adapter = path
            self._adapter_label = label
        logger.info(
            "Local model %r now serves as %r (switched in %.2f s)",
            previous,
            self.model_name,
            time.perf_counter() - started,
        )

    def _swap_adapter(self, model: Any, path: Path) -> Any:
        from peft import PeftModel

        name = f"adapter-{time.monotonic_ns()}"
        try:
            if not isinstance(model, PeftModel):
                swapped = PeftModel.from_pretrained(model, path, adapter_name=name)
                swapped.eval()
                return swapped
            old = model.active_adapter
            model.load_adapter(path, adapter_name=name, is_trainable=False)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            if isinstance(model, PeftModel) and name in model.peft_config:
                model.delete_adapter(name)
            raise GeneratorUnavailable(
                f"Failed to load the adapter {str(path)!r} onto model {self._model_source!r}; "
                f"the current adapter keeps serving: {exc}",
                original=exc,
            ) from exc
        model.set_adapter(name)
        model.delete_adapter(old)
        model.eval()
        return model

    # generation

    async def generate(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        *,
        on_delta: DeltaCallback | None = None,
    ) -> GenerationResult:
        """Generate the reply to ``messages``, batched with concurrent requests.

        With ``on_delta``, reply text is delivered in order as tokens are produced, never
        containing a stop marker, and ``generate`` returns after the last delta. The deltas
        concatenate to the returned text, except when clean-up trimmed a repeated sentence: then
        the returned text is a prefix of the concatenated deltas, and ``details`` contains
        ``stream_diverged=True`` so the caller can replace the streamed message. An exception
        raised by ``on_delta`` propagates, and the request's reply is discarded.
        """
        loaded = self._require_loaded()
        # Encoding happens on the event loop thread only, because transformers 5.x tokenizers
        # switch an encoding option on their shared backend for each call.
        prompt_ids = encode_chat(loaded.tokenizer, messages)
        context_length = self.context_length
        if len(prompt_ids) >= context_length:
            raise ContextLengthExceeded(
                f"The prompt has {len(prompt_ids)} tokens, but model {self.model_name!r} accepts "
                f"{context_length} tokens of prompt and reply together; shorten the history."
            )

        request = _Request(
            prompt_ids=prompt_ids,
            params=params,
            future=asyncio.get_running_loop().create_future(),
            deltas=asyncio.Queue() if on_delta is not None else None,
        )
        self._queue.put_nowait(request)

        try:
            if on_delta is not None and request.deltas is not None:
                while (delta := await request.deltas.get()) is not None:
                    await on_delta(delta)
            return await request.future
        except BaseException:
            # The caller was cancelled (for example by a timeout) or on_delta raised. The worker
            # skips the request if its batch has not started, and discards its reply otherwise.
            request.abandoned = True
            request.future.cancel()
            raise

    # micro-batcher

    async def _run_batcher(self) -> None:
        stopping = False
        while True:
            if self._held:
                first = self._held.popleft()
            elif stopping:
                break
            else:
                item = await self._queue.get()
                if item is _STOP:
                    stopping = True
                    continue
                first = item

            if first.abandoned:
                self.stats.skipped_cancelled += 1
                continue

            batch, saw_stop = await self._collect_batch(first, wait=not stopping)
            stopping = stopping or saw_stop
            # Callers may have given up while the batch was forming.
            running = [request for request in batch if not request.abandoned]
            self.stats.skipped_cancelled += len(batch) - len(running)
            if not running:
                continue
            batch = running
            try:
                async with self._model_lock:
                    await self._run_batch(batch)
            except Exception as exc:
                # A bug here must not end the worker, because every later request would wait.
                logger.exception("Local model %r: unexpected error in the batcher", self.model_name)
                for request in batch:
                    self._finish(request, error=self._make_batch_error(exc))

        self._fail_unserved("the generator stopped before the request was served")

    async def _collect_batch(self, first: _Request, *, wait: bool) -> tuple[list[_Request], bool]:
        batch = [first]

        # Held requests arrived before anything still in the queue, so they join first.
        for request in list(self._held):
            if len(batch) >= self._max_batch_size:
                break
            if request.params == first.params:
                self._held.remove(request)
                if request.abandoned:
                    self.stats.skipped_cancelled += 1
                else:
                    batch.append(request)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._batch_wait_s if wait else 0.0)
        saw_stop = False
        while len(batch) < self._max_batch_size:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if saw_stop or remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                item = self._queue.get_nowait()

            if item is _STOP:
                saw_stop = True
            elif item.abandoned:
                self.stats.skipped_cancelled += 1
            elif item.params == first.params:
                batch.append(item)
            else:
                self._held.append(item)
        return batch, saw_stop

    async def _run_batch(self, batch: list[_Request]) -> None:
        loaded = self._loaded
        assert loaded is not None and self._loop is not None
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.batch_sizes[len(batch)] += 1

        started = time.perf_counter()
        try:
            outputs = await asyncio.to_thread(self._generate_batch, loaded, batch, self._loop)
        except Exception as exc:
            self.stats.failed_batches += 1
            logger.exception(
                "Local model %r failed on a batch of %d requests", self.model_name, len(batch)
            )
            for request in batch:
                self._finish(request, error=self._make_batch_error(exc))
            return

        elapsed = time.perf_counter() - started
        logger.info(
            "Local model %r generated %d replies in one batch in %.2f s (%d new tokens)",
            self.model_name,
            len(batch),
            elapsed,
            sum(output.completion_tokens for output in outputs),
        )
        for request, output in zip(batch, outputs, strict=True):
            details: dict[str, object] = {
                "batch_size": len(batch),
                "generation_s": round(elapsed, 3),
            }
            if output.stream_diverged:
                details["stream_diverged"] = True
            result = GenerationResult(
                text=output.text,
                finish_reason=output.finish_reason,
                model=self.model_name,
                prompt_tokens=len(request.prompt_ids),
                completion_tokens=output.completion_tokens,
                details=details,
            )
            logger.debug(
                "Reply finished (%s): %d prompt tokens, %d completion tokens",
                output.finish_reason.value,
                len(request.prompt_ids),
                output.completion_tokens,
            )
            self._finish(request, result=result, stream_tail=output.stream_tail)

    def _make_batch_error(self, exc: Exception) -> GenerationError:
        # One instance per request, because a shared one would collect every caller's traceback.
        error = GenerationError(
            f"The local model {self.model_name!r} failed to generate a reply: {exc}", original=exc
        )
        error.__cause__ = exc
        return error

    def _finish(
        self,
        request: _Request,
        *,
        result: GenerationResult | None = None,
        error: BaseException | None = None,
        stream_tail: str = "",
    ) -> None:
        if request.deltas is not None:
            if stream_tail and result is not None:
                request.deltas.put_nowait(stream_tail)
            request.deltas.put_nowait(None)
        if request.future.done():
            return  # the caller was cancelled, so the reply is discarded
        if error is not None:
            request.future.set_exception(error)
        else:
            request.future.set_result(result)  # type: ignore[arg-type]

    def _fail_unserved(self, reason: str) -> None:
        unserved = list(self._held)
        self._held.clear()
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not _STOP:
                unserved.append(item)
        for request in unserved:
            self._finish(request, error=GeneratorUnavailable(f"No reply: {reason}."))

    # model call (runs in a worker thread)

    def _generate_batch(
        self, loaded: _LoadedModel, batch: list[_Request], loop: asyncio.AbstractEventLoop
    ) -> list[_RowOutput]:
        params = batch[0].params
        longest = max(len(request.prompt_ids) for request in batch)

        # Left padding puts every prompt's last token in the last column, where generation
        # continues; the attention mask hides the padding.
        input_ids = torch.full((len(batch), longest), loaded.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, request in enumerate(batch):
            length = len(request.prompt_ids)
            input_ids[row, longest - length :] = torch.tensor(request.prompt_ids, dtype=torch.long)
            attention_mask[row, longest - length :] = 1

        # The padded prompt plus the reply must fit the context.
        max_new_tokens = min(params.max_new_tokens, loaded.context_length - longest)
        generation_config = self._build_generation_config(loaded, params, max_new_tokens)

        stopping_criteria = StoppingCriteriaList([_AbandonedRows(batch)])
        if loaded.stop_string_criteria is not None:
            stopping_criteria.append(loaded.stop_string_criteria)

        streamer = None
        if any(request.deltas is not None for request in batch):
            streamer = _BatchStreamer(
                tokenizer=loaded.tokenizer,
                queues=[request.deltas for request in batch],
                end_token_ids=[*loaded.end_token_ids, loaded.pad_token_id],
                stop_markers=self._stop_markers,
                loop=loop,
            )

        if params.seed is not None:
            # NOTE: seeds torch's global generator, so a seeded reply is reproducible only for the
            # same batch composition and while no other code in the process draws from it.
            torch.manual_seed(params.seed)

        with torch.inference_mode():
            sequences = loaded.model.generate(
                input_ids=input_ids.to(loaded.device),
                attention_mask=attention_mask.to(loaded.device),
                generation_config=generation_config,
                stopping_criteria=stopping_criteria,
                streamer=streamer,
            )
        new_tokens = sequences[:, longest:].tolist()

        outputs = []
        for row, tokens in enumerate(new_tokens):
            output = self._finish_row(loaded, tokens, max_new_tokens)
            if streamer is not None and batch[row].deltas is not None:
                sent = streamer.sent_text(row)
                if output.text.startswith(sent):
                    output.stream_tail = output.text[len(sent) :]
                else:
                    output.stream_diverged = True
            outputs.append(output)
        return outputs

    def _build_generation_config(
        self, loaded: _LoadedModel, params: SamplingParams, max_new_tokens: int
    ) -> Any:
        config = copy.deepcopy(loaded.generation_config)
        config.max_new_tokens = max_new_tokens
        config.max_length = None
        config.min_new_tokens = None
        config.num_beams = 1
        config.repetition_penalty = params.repetition_penalty
        config.eos_token_id = loaded.end_token_ids
        config.pad_token_id = loaded.pad_token_id
        if params.greedy:
            config.do_sample = False
            config.temperature = None
            config.top_p = None
            config.top_k = None
        else:
            config.do_sample = True
            config.temperature = params.temperature
            config.top_p = params.top_p
        return config

    def _finish_row(
        self, loaded: _LoadedModel, tokens: list[int], max_new_tokens: int
    ) -> _RowOutput:
        # A finished row is filled with pad tokens up to the longest row of the batch.
        stop_ids = set(loaded.end_token_ids) | {loaded.pad_token_id}
        end = next((index for index, token in enumerate(tokens) if token in stop_ids), None)
        ended = end is not None
        reply_tokens = tokens[:end] if ended else tokens
        raw_text = loaded.tokenizer.decode(reply_tokens, **_DECODE_KWARGS)
        cleaned = clean_reply(raw_text, self._stop_markers)

        if end is None:
            completion_tokens = len(tokens)
        elif cleaned.cut_at_marker:
            # The stop-string criterion ended the row, so the token at `end` is padding.
            completion_tokens = end
        else:
            # The model generated the end token.
            completion_tokens = end + 1
        if cleaned.cut_at_marker:
            reason = FinishReason.MARKER
        elif cleaned.repetition_trimmed:
            reason = FinishReason.REPETITION
        elif not ended and len(tokens) >= max_new_tokens:
            reason = FinishReason.LENGTH
        else:
            reason = FinishReason.STOP
        return _RowOutput(
            text=cleaned.text, finish_reason=reason, completion_tokens=completion_tokens
        )


def _model_type(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


class _AbandonedRows(StoppingCriteria):
    """Stopping criterion that ends the rows whose caller stopped waiting, so that a batch of
    abandoned requests ends early."""

    def __init__(self, batch: list[_Request]) -> None:
        self._batch = batch

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = [request.abandoned for request in self._batch]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class _StreamRow:
    """Streaming state of one batch row: its tokens, the text decoded and the text sent."""

    def __init__(self, queue: asyncio.Queue[str | None], stop_markers: Sequence[str]) -> None:
        self.queue = queue
        self.tokens: list[int] = []
        self.decoded = ""
        self.guard = StreamGuard(stop_markers)
        # Text passed by the guard but held back: leading whitespace before any text, and
        # trailing whitespace, because the final text is stripped.
        self.pending = ""
        self.sent = ""
        # False once the row's tokens ended or its streaming stopped.
        self.active = True


class _BatchStreamer(BaseStreamer):
    """A transformers streamer that sends each batch row's new text to the row's request.

    ``generate`` calls ``put`` first with the prompt ids, then once per step with one new token
    per row, then ``end``. Each row is decoded incrementally on the generate thread, filtered
    through a StreamGuard so no stop marker is streamed, and its text is handed to the event
    loop with ``call_soon_threadsafe``, in order.
    """

    def __init__(
        self,
        *,
        tokenizer: Any,
        queues: Sequence[asyncio.Queue[str | None] | None],
        end_token_ids: Sequence[int],
        stop_markers: Sequence[str],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._tokenizer = tokenizer
        self._rows = [
            _StreamRow(queue, stop_markers) if queue is not None else None for queue in queues
        ]
        self._end_token_ids = set(end_token_ids)
        self._loop = loop
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return

        # Usually one token per row per step. A 2-D value carries several tokens per row.
        step_tokens = value.reshape(len(self._rows), -1).tolist()
        for row, tokens in zip(self._rows, step_tokens, strict=True):
            if row is None or not row.active:
                continue
            for token in tokens:
                if token in self._end_token_ids:
                    row.active = False
                    break
                row.tokens.append(token)
            self._stream_row(row)

    def end(self) -> None:
        # The final text, computed after generate returns, supplies what is still held back.
        pass

    def sent_text(self, index: int) -> str:
        row = self._rows[index]
        return row.sent if row is not None else ""

    def _stream_row(self, row: _StreamRow) -> None:
        text = self._tokenizer.decode(row.tokens, **_DECODE_KWARGS).rstrip(_INCOMPLETE_CHAR)
        if not text.startswith(row.decoded):
            # Decoding more tokens changed text already decoded; stop streaming this row rather
            # than send text that the final reply will not contain.
            row.active = False
            return
        new_text, row.decoded = text[len(row.decoded) :], text

        row.pending += row.guard.feed(new_text)
        if row.guard.stopped:
            # A stop marker appeared. The text before it is still sent, and nothing after it.
            row.active = False
        if not row.sent:
            row.pending = row.pending.lstrip()
        ready = row.pending.rstrip()
        if not ready:
            return
        row.pending = row.pending[len(ready) :]
        row.sent += ready
        self._loop.call_soon_threadsafe(row.queue.put_nowait, ready)
