"""A stand-in OpenAI-compatible chat-completions server on 127.0.0.1, scripted per test.

It follows the shape of OpenAI's ``POST /v1/chat/completions``: a JSON
``chat.completion`` object, or with ``"stream": true`` server-sent events of
``chat.completion.chunk`` objects ending in ``data: [DONE]``, and errors as
``{"error": {"message", "type", "code"}}``. Every request body is recorded.

Each request takes the next scripted behaviour (``script``); once the script
is used up, ``default`` responds. ``max_messages`` makes any request with more
messages fail first with a context-length error, as vLLM's 400 does.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

COMPLETIONS_PATH = "/v1/chat/completions"


@dataclass(frozen=True, kw_only=True)
class Reply:
    """A successful completion.

    ``text`` None echoes the newest user message. When streamed, the text goes
    out in pieces of ``chunk_chars`` characters, ``chunk_delay_s`` apart. With
    ``stall_after_chunks`` set, the stream stops sending after that many pieces
    and keeps the connection open until the server closes.
    """

    text: str | None = None
    finish_reason: str = "stop"
    include_usage: bool = True
    chunk_chars: int = 4
    chunk_delay_s: float = 0.0
    stall_after_chunks: int | None = None


@dataclass(frozen=True, kw_only=True)
class ErrorReply:
    """An error response in OpenAI's shape, with optional extra headers such as Retry-After."""

    status: int
    message: str = "The server had an error while processing your request."
    type: str = "server_error"
    code: str | int | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Hang:
    """Read the request and send nothing until the server closes."""


@dataclass(frozen=True)
class HeldReply:
    """Read the request, wait until ``OpenAIStandIn.release`` is set, then send ``reply``."""

    reply: Reply = field(default_factory=Reply)


Behaviour = Reply | ErrorReply | Hang | HeldReply


def too_many_requests(retry_after: str | None = None) -> ErrorReply:
    """Return a 429 rate-limit error, with a Retry-After header when given."""
    return ErrorReply(
        status=429,
        message="Rate limit reached for requests.",
        type="rate_limit_exceeded",
        code="rate_limit_exceeded",
        headers={"Retry-After": retry_after} if retry_after is not None else {},
    )


def server_error(status: int = 500) -> ErrorReply:
    return ErrorReply(status=status, type="server_error", code=status)


def vllm_context_length_error(prompt_tokens: int, context_length: int = 64) -> ErrorReply:
    """Return a 400 worded like vLLM's, with the numeric code vLLM puts in ``code``."""
    return ErrorReply(
        status=400,
        message=(
            f"This model's maximum context length is {context_length} tokens. However, your "
            f"request has {prompt_tokens} input tokens. Please reduce the length of the input "
            "messages."
        ),
        type="BadRequestError",
        code=400,
    )


def openai_context_length_error() -> ErrorReply:
    """Return a 400 that names the problem only by OpenAI's error code."""
    return ErrorReply(
        status=400,
        message="Your messages resulted in too many tokens for this model.",
        type="invalid_request_error",
        code="context_length_exceeded",
    )


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    # Header names in lower case.
    headers: dict[str, str]
    body: Any
    # time.monotonic() when the request body had been read.
    received_at: float

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", [])) if isinstance(self.body, dict) else []


class OpenAIStandIn:
    """The stand-in server; use it as a context manager, which starts and closes it."""

    def __init__(
        self,
        *,
        model: str = "standin-model",
        default: Behaviour | None = None,
        max_messages: int | None = None,
        context_error: ErrorReply | None = None,
    ) -> None:
        self.model = model
        self.default: Behaviour = default if default is not None else Reply()
        self.max_messages = max_messages
        self.context_error = context_error
        self.requests: list[RecordedRequest] = []

        self._script: deque[Behaviour] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        # Set on close, so that hanging handlers return and their threads end.
        self.closing = threading.Event()
        # Set by a test to let every HeldReply request send its response.
        self.release = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("The stand-in server is not started; use it in a `with` block.")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next requests, one per request, in order."""
        with self._lock:
            self._script.extend(behaviours)

    def start(self) -> None:
        # Port 0 lets the kernel pick a free ephemeral port.
        self._server = _Server(("127.0.0.1", 0), _Handler, standin=self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="openai-standin",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        self.closing.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> OpenAIStandIn:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # Called from handler threads

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def next_behaviour(self, body: Any) -> Behaviour:
        messages = body.get("messages", []) if isinstance(body, dict) else []
        if self.max_messages is not None and len(messages) > self.max_messages:
            if self.context_error is not None:
                return self.context_error
            return vllm_context_length_error(prompt_tokens=_count_words(messages))
        with self._lock:
            return self._script.popleft() if self._script else self.default

    def next_id(self) -> str:
        return f"chatcmpl-standin-{next(self._ids)}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Closing must not wait for threads that sit in an idle keep-alive connection.
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type, *, standin: OpenAIStandIn) -> None:
        super().__init__(address, handler)
        self.standin = standin


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def do_POST(self) -> None:
        standin = self.server.standin
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = None
        standin.record(
            RecordedRequest(
                method="POST",
                path=self.path,
                headers={name.lower(): value for name, value in self.headers.items()},
                body=body,
                received_at=time.monotonic(),
            )
        )

        if self.path != COMPLETIONS_PATH:
            self._send_error(ErrorReply(status=404, message=f"Not found: {self.path}", code=404))
            return
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            self._send_error(
                ErrorReply(
                    status=400,
                    message="The request body must be a JSON object with a `messages` list.",
                    type="invalid_request_error",
                )
            )
            return

        behaviour = standin.next_behaviour(body)
        try:
            if isinstance(behaviour, HeldReply):
                while not standin.release.wait(0.05):
                    if standin.closing.is_set():
                        self.close_connection = True
                        return
                behaviour = behaviour.reply
            if isinstance(behaviour, Hang):
                self._hang()
            elif isinstance(behaviour, ErrorReply):
                self._send_error(behaviour)
            elif body.get("stream"):
                self._send_stream(behaviour, body)
            else:
                self._send_completion(behaviour, body)
        except (BrokenPipeError, ConnectionResetError):
            # The client closed the connection, as a generator does after a chat-role marker.
            self.close_connection = True

    # Responses

    def _hang(self) -> None:
        self.server.standin.closing.wait()
        self.close_connection = True

    def _send_json(
        self, status: int, payload: object, headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: ErrorReply) -> None:
        payload = {
            "error": {
                "message": error.message,
                "type": error.type,
                "param": None,
                "code": error.code,
            }
        }
        self._send_json(error.status, payload, error.headers)

    def _send_completion(self, reply: Reply, body: dict[str, Any]) -> None:
        text = _reply_text(reply, body)
        payload: dict[str, Any] = {
            "id": self.server.standin.next_id(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.server.standin.model),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": reply.finish_reason,
                }
            ],
        }
        if reply.include_usage:
            payload["usage"] = _usage(body["messages"], text)
        self._send_json(HTTPStatus.OK, payload)

    def _send_stream(self, reply: Reply, body: dict[str, Any]) -> None:
        text = _reply_text(reply, body)
        completion_id = self.server.standin.next_id()
        created = int(time.time())
        model = body.get("model", self.server.standin.model)

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                ],
            }

        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        self._send_event(chunk({"role": "assistant", "content": ""}, None))
        size = max(1, reply.chunk_chars)
        pieces = [text[start : start + size] for start in range(0, len(text), size)]
        for index, piece in enumerate(pieces):
            if reply.stall_after_chunks is not None and index >= reply.stall_after_chunks:
                self._hang()
                return
            if reply.chunk_delay_s:
                time.sleep(reply.chunk_delay_s)
            self._send_event(chunk({"content": piece}, None))
        self._send_event(chunk({}, reply.finish_reason))

        stream_options = body.get("stream_options") or {}
        if reply.include_usage and stream_options.get("include_usage"):
            usage_chunk = chunk({}, None)
            usage_chunk["choices"] = []
            usage_chunk["usage"] = _usage(body["messages"], text)
            self._send_event(usage_chunk)
        self._send_chunked(b"data: [DONE]\n\n")
        self._send_chunked(b"")

    def _send_event(self, payload: object) -> None:
        self._send_chunked(f"data: {json.dumps(payload)}\n\n".encode())

    def _send_chunked(self, data: bytes) -> None:
        """Write one piece of a chunked transfer-encoded body; empty data ends the body."""
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _reply_text(reply: Reply, body: dict[str, Any]) -> str:
    if reply.text is not None:
        return reply.text
    users = [message for message in body["messages"] if message.get("role") == "user"]
    newest = users[-1].get("content", "") if users else ""
    return f"You said: {newest}"


def _count_words(messages: list[Any]) -> int:
    return sum(len(str(message.get("content", "")).split()) for message in messages)


def _usage(messages: list[Any], text: str) -> dict[str, int]:
    """Return usage counted in whitespace-separated words, a stand-in for real tokens."""
    prompt_tokens = _count_words(messages)
    completion_tokens = len(text.split())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
