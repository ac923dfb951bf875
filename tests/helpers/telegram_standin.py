"""A stand-in Telegram Bot API server on 127.0.0.1 for end-to-end tests of the Telegram adapter.

python-telegram-bot (PTB) 22 talks to it over HTTP as it would to api.telegram.org::

    async with TelegramStandin() as server:
        application = (
            Application.builder()
            .token(server.token)
            .base_url(server.base_url)
            .base_file_url(server.base_file_url)
            .build()
        )

It follows the Bot API documentation (https://core.telegram.org/bots/api):
requests are ``GET`` or ``POST {base}/bot<token>/<method>`` with parameters in
the query string, a JSON body, a urlencoded form or a multipart form (PTB 22
sends forms, with non-string values JSON-encoded). Method names match without
regard to case, as on api.telegram.org. Responses are ``{"ok": true,
"result": ...}`` or ``{"ok": false, "error_code": N, "description": "...",
"parameters": {...}}``. The MarkdownV2 and HTML parsers follow the documented
rules, and the edge cases and error messages that tdlib's own tests expect of
the Bot API server's parsers (tdlib/td, test/message_entities.cpp). Offsets in
those errors count UTF-8 bytes; entity offsets count UTF-16 code units.

Tests enqueue updates with the ``enqueue_*`` helpers, read what the bot did
from ``sent``, ``chat_actions``, ``commands``, ``webhook`` and ``deliveries``,
wait for it with the ``wait_for_*`` methods, and script failures with
``fail_next`` and ``block_chat``. Known differences from Telegram are marked
``NOTE:`` where they sit. The larger ones: like a local Bot API server, it
accepts plain HTTP webhook URLs on any port, but only on loopback hosts.
Privacy mode in groups is not simulated, so every enqueued group message is
delivered. Methods that the stand-in does not implement return 404 "Not
Found", as an unknown method does.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import logging
import re
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TOKEN = "123456789:AAHstandinTokenForMindHarborTests_01"
DEFAULT_GROUP_CHAT_ID = -1001234567890
DEFAULT_CHANNEL_CHAT_ID = -1009876543210

# Limits from the Bot API documentation of sendMessage, getUpdates and setMyCommands.
MAX_MESSAGE_LENGTH = 4096
MAX_UPDATES_LIMIT = 100
MAX_BOT_COMMANDS = 100

SECRET_TOKEN_HEADER = "X-Telegram-Bot-Api-Secret-Token"

# Every field of the Update object in the Bot API documentation, up to the
# version that added guest_message, managed_bot and subscription.
ALL_UPDATE_TYPES = frozenset(
    {
        "guest_message",
        "managed_bot",
        "subscription",
        "message",
        "edited_message",
        "channel_post",
        "edited_channel_post",
        "business_connection",
        "business_message",
        "edited_business_message",
        "deleted_business_messages",
        "message_reaction",
        "message_reaction_count",
        "inline_query",
        "chosen_inline_result",
        "callback_query",
        "shipping_query",
        "pre_checkout_query",
        "purchased_paid_media",
        "poll",
        "poll_answer",
        "my_chat_member",
        "chat_member",
        "chat_join_request",
        "chat_boost",
        "removed_chat_boost",
    }
)
# Without allowed_updates, or with an empty list, Telegram sends all types except these.
OPT_IN_UPDATE_TYPES = frozenset({"chat_member", "message_reaction", "message_reaction_count"})

CHAT_ACTIONS = frozenset(
    {
        "typing",
        "upload_photo",
        "record_video",
        "upload_video",
        "record_voice",
        "upload_voice",
        "upload_document",
        "choose_sticker",
        "find_location",
        "record_video_note",
        "upload_video_note",
    }
)

_TOKEN_FORMAT = re.compile(r"^\d+:[A-Za-z0-9_-]+$")
_SECRET_TOKEN_FORMAT = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
_BOT_COMMAND_FORMAT = re.compile(r"^[a-z0-9_]{1,32}$")
_LANGUAGE_CODE_FORMAT = re.compile(r"^[a-z]{2}$")
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def utf16_length(text: str) -> int:
    """Return the length of text in UTF-16 code units, the unit of Bot API lengths and offsets."""
    return len(text.encode("utf-16-le")) // 2


# Errors and scripted faults


class ApiError(Exception):
    """A Bot API error response, raised in a handler or queued with ``fail_next``.

    ``raw_body`` replaces the JSON error object, as an HTML page from a proxy would.
    """

    def __init__(
        self,
        status: int,
        description: str,
        *,
        parameters: dict[str, Any] | None = None,
        raw_body: bytes | None = None,
    ) -> None:
        super().__init__(f"{status} {description}")
        self.status = status
        self.description = description
        self.parameters = parameters
        self.raw_body = raw_body

    def to_response(self) -> web.Response:
        if self.raw_body is not None:
            return web.Response(status=self.status, body=self.raw_body, content_type="text/html")
        payload: dict[str, Any] = {
            "ok": False,
            "error_code": self.status,
            "description": self.description,
        }
        if self.parameters:
            payload["parameters"] = self.parameters
        return web.json_response(payload, status=self.status)


@dataclass(frozen=True)
class DropConnection:
    """A fault that closes the connection without sending a response."""


@dataclass(frozen=True)
class Delay:
    """A fault that delays the request by ``seconds``, after which it is handled normally."""

    seconds: float


Fault = ApiError | DropConnection | Delay


def bad_request(reason: str) -> ApiError:
    return ApiError(400, f"Bad Request: {reason}")


def too_many_requests(retry_after: int) -> ApiError:
    """Return the flood-control error, which PTB raises as ``RetryAfter``."""
    return ApiError(
        429,
        f"Too Many Requests: retry after {retry_after}",
        parameters={"retry_after": retry_after},
    )


def forbidden(reason: str = "bot was blocked by the user") -> ApiError:
    return ApiError(403, f"Forbidden: {reason}")


def conflict_terminated() -> ApiError:
    """Return the error of a getUpdates request that a newer getUpdates request replaced."""
    return ApiError(
        409,
        "Conflict: terminated by other getUpdates request; "
        "make sure that only one bot instance is running",
    )


def conflict_webhook_active() -> ApiError:
    return ApiError(
        409,
        "Conflict: can't use getUpdates method while webhook is active; "
        "use deleteWebhook to delete the webhook first",
    )


def server_error(status: int = 500, description: str | None = None) -> ApiError:
    descriptions = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
    return ApiError(status, description or descriptions.get(status, "Internal Server Error"))


def _not_found() -> ApiError:
    return ApiError(404, "Not Found")


def _unauthorized() -> ApiError:
    return ApiError(401, "Unauthorized")


# Formatted text: MarkdownV2 and HTML parsing


@dataclass(frozen=True)
class ParsedText:
    """Message text after markup parsing, with its Bot API MessageEntity objects."""

    text: str
    entities: list[dict[str, Any]]


class EntityParseError(ValueError):
    """Markup that the Bot API rejects, with the message that follows "can't parse entities: "."""


def _byte_offsets(text: str) -> list[int]:
    """Return the UTF-8 byte offset of every code point of text, plus the total length."""
    return list(itertools.accumulate((len(ch.encode()) for ch in text), initial=0))


def _url_entity(url: str, offset: int, length: int) -> dict[str, Any] | None:
    """Return the entity for a link, or None when the URL is not one Telegram accepts.

    ``tg://user?id=N`` (or ``tg:user?id=N``) becomes a text_mention, as in the
    Bot API. Other URLs are accepted when they have a scheme, or look like a
    host name, which gets ``http://`` in front.
    NOTE: tdlib also normalises accepted URLs, for example "telegram.org"
    becomes "http://telegram.org/"; the stand-in keeps the path as written.
    """
    mention = re.fullmatch(r"tg:(?://)?user\?id=(\d+)", url, flags=re.IGNORECASE)
    if mention:
        user = {"id": int(mention.group(1)), "is_bot": False, "first_name": ""}
        return {"type": "text_mention", "offset": offset, "length": length, "user": user}
    if not url or any(ch.isspace() for ch in url):
        return None
    if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", url):
        host = re.split(r"[/?#:]", url, maxsplit=1)[0]
        if not re.fullmatch(r"[^.\s]+(\.[^.\s]+)*\.[A-Za-z]{2,}", host):
            return None
        url = f"http://{url}"
    return {"type": "text_link", "offset": offset, "length": length, "url": url}


def _custom_emoji_id(url: str) -> str:
    """Return the identifier from a ``tg://emoji?id=N`` URL, raising tdlib's errors."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):(//)?([^/?#]*)[^?#]*(\?[^#]*)?", url)
    if match is None or match.group(1).lower() != "tg":
        raise EntityParseError("Custom emoji URL must have scheme tg")
    if match.group(3).lower() != "emoji":
        raise EntityParseError('Custom emoji URL must have host "emoji"')
    query = urllib.parse.parse_qs((match.group(4) or "?")[1:])
    if "id" not in query:
        raise EntityParseError("Custom emoji URL must have an emoji identifier")
    value = query["id"][0]
    if not re.fullmatch(r"[1-9][0-9]{0,18}", value):
        raise EntityParseError("Invalid custom emoji identifier specified")
    return value


@dataclass
class _OpenEntity:
    type: str
    # tdlib's name for the type, used in "Can't find end of ... entity" errors.
    name: str
    utf16_offset: int
    byte_offset: int
    in_quote: bool
    # len(output) when the entity opened: its text is output[output_index:].
    output_index: int
    language: str | None = None


@dataclass
class _OpenQuote:
    utf16_offset: int
    expandable: bool = False
    # Set by the expandability mark "||", after which the quote ends with its line.
    ends_at_line_break: bool = False


_MARKDOWN_V2_RESERVED = frozenset("_*[]()~`>#+-=|{}.!")
_CODE_RESERVED = frozenset("`")
_ASCII_SPACES = frozenset(" \t\r\n\v\f")


class _MarkdownV2Parser:
    """Parser for the MarkdownV2 style of the Bot API "Formatting options".

    The rules: any character with code 1-126 may be escaped with a preceding
    backslash; inside code and pre only "`" is markup (and "\\" escapes); in a
    link's "(...)" part ")" and "\\" must be escaped; everywhere else the
    characters ``_*[]()~`>#+-=|{}.!`` must be escaped. "__" is read greedily as
    underline. ">" at the start of a line starts or continues a block quote, and
    "||" at the end of its last line makes it expandable. Empty entities are
    dropped. Behaviour at the edges (which entity an error names, how a pre
    block's language and first line break are read, "\\r" before ">") follows
    tdlib's tests of parse_markdown_v2.
    NOTE: tdlib afterwards splits or drops entities that may not nest (for
    example code inside pre); the stand-in keeps them as parsed.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.bytes_at = _byte_offsets(source)
        self.output: list[str] = []
        self.utf16 = 0
        self.stack: list[_OpenEntity] = []
        self.entities: list[dict[str, Any]] = []
        self.quote: _OpenQuote | None = None
        # True when the output so far is empty or ends with "\n" (ignoring "\r").
        self.at_line_start = True
        # True right after a line break inside a quote: the next character decides
        # whether the quote goes on (">") or ends.
        self.quote_line_pending = False

    def parse(self) -> ParsedText:
        source = self.source
        i = 0
        while i < len(source):
            char = source[i]
            next_char = source[i + 1] if i + 1 < len(source) else ""
            in_code = bool(self.stack) and self.stack[-1].type in ("code", "pre")

            if self.quote_line_pending:
                self.quote_line_pending = False
                assert self.quote is not None
                if char == ">" and not self.quote.ends_at_line_break:
                    i += 1
                    continue
                self._close_quote()

            if char == "\\" and next_char and 0 < ord(next_char) <= 126:
                self._emit(next_char, in_code)
                i += 2
                continue

            reserved = _CODE_RESERVED if in_code else _MARKDOWN_V2_RESERVED
            if char not in reserved:
                self._emit(char, in_code)
                i += 1
                continue

            if self.stack and self._is_end_of(self.stack[-1], i):
                i = self._close_entity(i)
                continue

            if char == ">" and self.quote is None and self.at_line_start:
                self.quote = _OpenQuote(self.utf16)
                i += 1
                continue

            if self._is_expandability_mark(i):
                assert self.quote is not None
                self.quote.expandable = True
                self.quote.ends_at_line_break = True
                i += 2
                continue

            i = self._open_entity(i)

        if self.quote is not None:
            self._close_quote()
        if self.stack:
            raise self._unclosed(self.stack[-1])
        self.entities.sort(key=lambda entity: (entity["offset"], -entity["length"]))
        return ParsedText("".join(self.output), self.entities)

    def _emit(self, char: str, in_code: bool) -> None:
        self.output.append(char)
        self.utf16 += 2 if ord(char) > 0xFFFF else 1
        if char == "\n":
            self.at_line_start = True
            if self.quote is not None and not in_code:
                self.quote_line_pending = True
        elif char != "\r":
            self.at_line_start = False

    def _is_end_of(self, entity: _OpenEntity, i: int) -> bool:
        source = self.source
        char = source[i]
        following = source[i + 1 : i + 3]
        if entity.type == "bold":
            return char == "*"
        if entity.type == "italic":
            return char == "_" and following[:1] != "_"
        if entity.type == "underline":
            return char == "_" and following[:1] == "_"
        if entity.type == "strikethrough":
            return char == "~"
        if entity.type == "spoiler":
            return char == "|" and following[:1] == "|"
        if entity.type == "code":
            return char == "`"
        if entity.type == "pre":
            return char == "`" and following == "``"
        # text_link and custom_emoji both end at "]".
        return char == "]"

    def _is_expandability_mark(self, i: int) -> bool:
        source = self.source
        if self.quote is None or source[i : i + 2] != "||":
            return False
        if any(entity.in_quote for entity in self.stack):
            return False
        return i + 2 == len(source) or source[i + 2] in "\r\n"

    def _open_entity(self, i: int) -> int:
        source = self.source
        char = source[i]
        next_char = source[i + 1] if i + 1 < len(source) else ""
        start = i
        language = None
        if char == "_" and next_char == "_":
            kind, name, i = "underline", "Underline", i + 2
        elif char == "_":
            kind, name, i = "italic", "Italic", i + 1
        elif char == "*":
            kind, name, i = "bold", "Bold", i + 1
        elif char == "~":
            kind, name, i = "strikethrough", "Strikethrough", i + 1
        elif char == "|" and next_char == "|":
            kind, name, i = "spoiler", "Spoiler", i + 2
        elif char == "[":
            kind, name, i = "text_link", "TextUrl", i + 1
        elif char == "!" and next_char == "[":
            kind, name, i = "custom_emoji", "CustomEmoji", i + 2
        elif char == "`" and source[i + 1 : i + 3] == "``":
            kind, name = "pre", "Pre"
            i, language = self._read_pre_language(i + 3)
            if language is not None:
                name = "PreCode"
        elif char == "`":
            kind, name, i = "code", "Code", i + 1
        else:
            raise EntityParseError(
                f"Character '{char}' is reserved and must be escaped with the preceding '\\'"
            )
        self.stack.append(
            _OpenEntity(
                type=kind,
                name=name,
                utf16_offset=self.utf16,
                byte_offset=self.bytes_at[start],
                in_quote=self.quote is not None,
                output_index=len(self.output),
                language=language,
            )
        )
        return i

    def _read_pre_language(self, i: int) -> tuple[int, str | None]:
        """Read the language word after "```" and skip one line break after it."""
        source = self.source
        end = i
        while end < len(source) and source[end] not in _ASCII_SPACES and source[end] != "`":
            end += 1
        language = None
        if end > i and end < len(source) and source[end] != "`":
            language = source[i:end]
            i = end
        if i < len(source) and source[i] in "\r\n":
            pair = source[i : i + 2]
            i += 2 if pair in ("\r\n", "\n\r") else 1
        return i, language

    def _close_entity(self, i: int) -> int:
        entity = self.stack.pop()
        source = self.source
        length = self.utf16 - entity.utf16_offset
        result: dict[str, Any] | None = {
            "type": entity.type,
            "offset": entity.utf16_offset,
            "length": length,
        }

        if entity.type in ("underline", "spoiler"):
            i += 2
        elif entity.type == "pre":
            i += 3
            if entity.language:
                assert result is not None
                result["language"] = entity.language
        elif entity.type == "text_link":
            i += 1
            if i < len(source) and source[i] == "(":
                url, i = self._read_url(i + 1, url_kind="a URL")
            else:
                url = "".join(self.output[entity.output_index :])
            result = _url_entity(url, entity.utf16_offset, length)
        elif entity.type == "custom_emoji":
            i += 1
            if i >= len(source) or source[i] != "(":
                raise EntityParseError("Custom emoji entity must contain a tg://emoji URL")
            url, i = self._read_url(i + 1, url_kind="a custom emoji URL")
            assert result is not None
            result["custom_emoji_id"] = _custom_emoji_id(url)
        else:
            i += 1

        if result is not None and length > 0:
            self.entities.append(result)
        return i

    def _read_url(self, i: int, *, url_kind: str) -> tuple[str, int]:
        """Read a link's "(...)" part from i, just after "(", and return it unescaped."""
        source = self.source
        start = i
        url: list[str] = []
        while i < len(source) and source[i] != ")":
            if source[i] == "\\" and i + 1 < len(source) and 0 < ord(source[i + 1]) <= 126:
                url.append(source[i + 1])
                i += 2
            else:
                url.append(source[i])
                i += 1
        if i >= len(source):
            raise EntityParseError(
                f"Can't find end of {url_kind} at byte offset {self.bytes_at[start]}"
            )
        return "".join(url), i + 1

    def _close_quote(self) -> None:
        quote = self.quote
        assert quote is not None
        inside = [entity for entity in self.stack if entity.in_quote]
        if inside:
            raise self._unclosed(inside[-1])
        length = self.utf16 - quote.utf16_offset
        if length > 0:
            kind = "expandable_blockquote" if quote.expandable else "blockquote"
            self.entities.append({"type": kind, "offset": quote.utf16_offset, "length": length})
        self.quote = None
        self.quote_line_pending = False

    @staticmethod
    def _unclosed(entity: _OpenEntity) -> EntityParseError:
        return EntityParseError(
            f"Can't find end of {entity.name} entity at byte offset {entity.byte_offset}"
        )


def parse_markdown_v2(text: str) -> ParsedText:
    """Parse MarkdownV2 as the Bot API does, raising ``EntityParseError`` where it would."""
    return _MarkdownV2Parser(text).parse()


_HTML_TAG_TYPES = {
    "b": "bold",
    "strong": "bold",
    "i": "italic",
    "em": "italic",
    "u": "underline",
    "ins": "underline",
    "s": "strikethrough",
    "strike": "strikethrough",
    "del": "strikethrough",
    "tg-spoiler": "spoiler",
    "span": "spoiler",
    "a": "text_link",
    "code": "code",
    "pre": "pre",
    "tg-emoji": "custom_emoji",
    "blockquote": "blockquote",
}
_HTML_NAMED_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}


_NUMERIC_REFERENCE = re.compile(r"&#(?:[xX]([0-9A-Fa-f]+)|([0-9]+));?")
_NAMED_REFERENCE = re.compile(r"&([A-Za-z]+);?")


def _decode_html_entity(source: str, i: int) -> tuple[str, int]:
    """Decode the character reference at source[i], or return "&" itself when there is none."""
    numeric = _NUMERIC_REFERENCE.match(source, i)
    if numeric:
        code = int(numeric.group(1), 16) if numeric.group(1) else int(numeric.group(2))
        if 0xD800 <= code <= 0xDFFF:
            raise EntityParseError(
                "Text contains invalid Unicode characters after decoding HTML entities, "
                "check for unmatched surrogate code units"
            )
        if 0 < code <= 0x10FFFF:
            return chr(code), numeric.end()
        return "&", i + 1
    named = _NAMED_REFERENCE.match(source, i)
    if named and named.group(1) in _HTML_NAMED_ENTITIES:
        return _HTML_NAMED_ENTITIES[named.group(1)], named.end()
    return "&", i + 1


def _decode_html_entities(text: str) -> str:
    decoded: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "&":
            char, i = _decode_html_entity(text, i)
            decoded.append(char)
        else:
            decoded.append(text[i])
            i += 1
    return "".join(decoded)


@dataclass
class _OpenTag:
    name: str
    attributes: dict[str, str]
    utf16_offset: int
    text_offset: int


class _HtmlParser:
    """Parser for the HTML style of the Bot API "Formatting options".

    Supported tags are those in the documentation; only the named entities
    ``&lt; &gt; &amp; &quot;`` and numeric ones are decoded, others stay as
    written. ``</>`` closes the innermost tag. Error messages follow tdlib's
    tests of parse_html.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.bytes_at = _byte_offsets(source)
        self.output: list[str] = []
        self.utf16 = 0
        self.stack: list[_OpenTag] = []
        self.entities: list[dict[str, Any]] = []

    def parse(self) -> ParsedText:
        source = self.source
        i = 0
        while i < len(source):
            char = source[i]
            if char == "&":
                decoded, i = _decode_html_entity(self.source, i)
                self._emit(decoded)
            elif char == "<" and source[i + 1 : i + 2] == "/":
                i = self._read_end_tag(i)
            elif char == "<":
                i = self._read_start_tag(i)
            else:
                self._emit(char)
                i += 1
        if self.stack:
            name = self.stack[-1].name
            raise EntityParseError(f'Can\'t find end tag corresponding to start tag "{name}"')
        self._merge_pre_code()
        self.entities.sort(key=lambda entity: (entity["offset"], -entity["length"]))
        return ParsedText("".join(self.output), self.entities)

    def _emit(self, text: str) -> None:
        self.output.append(text)
        self.utf16 += utf16_length(text)

    def _read_start_tag(self, i: int) -> int:
        source = self.source
        tag_byte = self.bytes_at[i]
        j = i + 1
        while j < len(source) and source[j] not in _ASCII_SPACES and source[j] not in ">/":
            j += 1
        if j >= len(source):
            raise EntityParseError(f"Unclosed start tag at byte offset {tag_byte}")
        name = source[i + 1 : j].lower()
        if name not in _HTML_TAG_TYPES:
            raise EntityParseError(f'Unsupported start tag "{name}" at byte offset {tag_byte}')

        attributes: dict[str, str] = {}
        while True:
            while j < len(source) and source[j] in _ASCII_SPACES:
                j += 1
            if j >= len(source):
                raise EntityParseError(f'Unclosed start tag "{name}" at byte offset {tag_byte}')
            if source[j] == ">":
                j += 1
                break
            name_start = j
            while j < len(source) and (source[j].isalnum() or source[j] in "-_"):
                j += 1
            attribute = source[name_start:j].lower()
            if not attribute:
                raise EntityParseError(
                    f'Empty attribute name in the tag "{name}" at byte offset {tag_byte}'
                )
            while j < len(source) and source[j] in _ASCII_SPACES:
                j += 1
            value = ""
            if j < len(source) and source[j] == "=":
                j += 1
                while j < len(source) and source[j] in _ASCII_SPACES:
                    j += 1
                if j >= len(source):
                    raise EntityParseError(f'Unclosed start tag "{name}" at byte offset {tag_byte}')
                value, j = self._read_attribute_value(j, tag_byte)
            attributes[attribute] = value

        if name == "span" and attributes.get("class") != "tg-spoiler":
            raise EntityParseError('Tag "span" must have class "tg-spoiler"')
        self.stack.append(_OpenTag(name, attributes, self.utf16, len(self.output)))
        return j

    def _read_attribute_value(self, j: int, tag_byte: int) -> tuple[str, int]:
        source = self.source
        if j < len(source) and source[j] in "\"'":
            quote = source[j]
            end = source.find(quote, j + 1)
            if end < 0:
                raise EntityParseError(f"Unclosed start tag at byte offset {tag_byte}")
            return _decode_html_entities(source[j + 1 : end]), end + 1
        start = j
        while j < len(source) and source[j] not in _ASCII_SPACES and source[j] != ">":
            j += 1
        if j >= len(source):
            raise EntityParseError(
                f"Unexpected end of name token at byte offset {self.bytes_at[start]}"
            )
        return source[start:j], j

    def _read_end_tag(self, i: int) -> int:
        source = self.source
        tag_byte = self.bytes_at[i]
        if not self.stack:
            raise EntityParseError(f"Unexpected end tag at byte offset {tag_byte}")
        end = source.find(">", i + 2)
        if end < 0:
            raise EntityParseError(f"Unclosed end tag at byte offset {tag_byte}")
        name = source[i + 2 : end].strip().lower()
        tag = self.stack[-1]
        if name and name != tag.name:
            raise EntityParseError(
                f"Unmatched end tag at byte offset {tag_byte}, "
                f'expected "</{tag.name}>", found "</{name}>"'
            )
        self.stack.pop()
        self._add_entity(tag)
        return end + 1

    def _add_entity(self, tag: _OpenTag) -> None:
        length = self.utf16 - tag.utf16_offset
        if length == 0:
            return
        kind = _HTML_TAG_TYPES[tag.name]
        entity: dict[str, Any] | None = {"type": kind, "offset": tag.utf16_offset, "length": length}
        if tag.name == "a":
            text = "".join(self.output[tag.text_offset :])
            url = tag.attributes.get("href", text)
            entity = _url_entity(url, tag.utf16_offset, length)
        elif tag.name == "tg-emoji":
            emoji_id = tag.attributes.get("emoji-id", "")
            if not re.fullmatch(r"[1-9][0-9]{0,18}", emoji_id):
                raise EntityParseError("Invalid custom emoji identifier specified")
            assert entity is not None
            entity["custom_emoji_id"] = emoji_id
        elif tag.name == "blockquote" and "expandable" in tag.attributes:
            assert entity is not None
            entity["type"] = "expandable_blockquote"
        elif tag.name == "code":
            css_class = tag.attributes.get("class", "")
            if css_class.startswith("language-") and len(css_class) > len("language-"):
                assert entity is not None
                entity["_language"] = css_class[len("language-") :]
        if entity is not None:
            self.entities.append(entity)

    def _merge_pre_code(self) -> None:
        """Give a pre entity the language of a code entity with exactly the same span.

        ``<pre><code class="language-x">`` makes one pre entity with a language,
        as documented; a code entity with any other span loses its class.
        """
        spans = {(e["offset"], e["length"]): e for e in self.entities if e["type"] == "pre"}
        merged: list[dict[str, Any]] = []
        for entity in self.entities:
            language = entity.pop("_language", None)
            pre = spans.get((entity["offset"], entity["length"]))
            if entity["type"] == "code" and language and pre is not None:
                pre["language"] = language
                continue
            merged.append(entity)
        self.entities = merged


def parse_html(text: str) -> ParsedText:
    """Parse Bot API HTML as the Bot API does, raising ``EntityParseError`` where it would."""
    return _HtmlParser(text).parse()


_AUTO_ENTITY_PATTERN = re.compile(
    r"(?P<bot_command>(?<![\w/])/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{3,32})?(?![\w/]))"
    r"|(?P<mention>(?<![\w@])@[A-Za-z0-9_]{3,32}(?!\w))"
    r"|(?P<hashtag>(?<![\w#])#\w+)"
    r"|(?P<url>https?://\S+)"
)


def detect_entities(text: str) -> list[dict[str, Any]]:
    """Return the entities Telegram adds to an incoming text: commands, mentions, hashtags, URLs.

    Telegram also detects cashtags, e-mail addresses, phone numbers and URLs
    without a scheme, which this function leaves out.
    """
    entities = []
    for match in _AUTO_ENTITY_PATTERN.finditer(text):
        kind = match.lastgroup
        assert kind is not None
        entities.append(
            {
                "type": kind,
                "offset": utf16_length(text[: match.start()]),
                "length": utf16_length(match.group()),
            }
        )
    return entities


# Records of what the bot did


@dataclass(frozen=True)
class TgUser:
    """A Telegram user (or another bot) who sends updates to the bot under test."""

    id: int
    first_name: str
    last_name: str | None = None
    username: str | None = None
    language_code: str | None = "en"
    is_bot: bool = False

    def to_dict(self) -> dict[str, Any]:
        user: dict[str, Any] = {"id": self.id, "is_bot": self.is_bot, "first_name": self.first_name}
        if self.last_name is not None:
            user["last_name"] = self.last_name
        if self.username is not None:
            user["username"] = self.username
        if self.language_code is not None and not self.is_bot:
            user["language_code"] = self.language_code
        return user


DEFAULT_USER = TgUser(id=1001, first_name="Alice", username="alice", language_code="en")


@dataclass
class SentMessage:
    """A message that the bot sent with sendMessage, kept current through edits and deletion."""

    chat_id: int
    message_id: int
    # The text parameter as sent, markup included.
    text: str
    parse_mode: str | None
    # The text after markup parsing, as Telegram clients display it.
    plain_text: str
    entities: list[dict[str, Any]]
    reply_to_message_id: int | None
    reply_markup: dict[str, Any] | None
    link_preview_options: dict[str, Any] | None
    message_thread_id: int | None
    disable_notification: bool
    # Every parameter of the request, decoded.
    params: dict[str, Any]
    # The Message object that sendMessage or the latest editMessageText returned.
    message: dict[str, Any]
    # Plain texts before each edit, oldest first.
    previous_texts: list[str] = field(default_factory=list)
    deleted: bool = False


@dataclass(frozen=True)
class ChatAction:
    chat_id: int
    action: str
    message_thread_id: int | None
    # time.monotonic() when the request arrived.
    at: float


@dataclass(frozen=True)
class WebhookConfig:
    """The webhook set with setWebhook, as the bot sent it."""

    url: str
    secret_token: str | None
    allowed_updates: list[str] | None
    max_connections: int
    drop_pending_updates: bool
    ip_address: str | None


@dataclass(frozen=True)
class Delivery:
    """One POST of an update to the webhook, with ``status`` None when the connection failed."""

    update_id: int
    attempt: int
    url: str
    status: int | None
    error: str | None
    secret_token_sent: str | None
    at: float


@dataclass
class ApiCall:
    """One request to the Bot API, with its decoded parameters and the response's HTTP status."""

    method: str
    params: dict[str, Any]
    status: int | None = None
    description: str | None = None
    # "http" for requests from the bot, "webhook-reply" for a method in a webhook response.
    source: str = "http"


@dataclass(frozen=True)
class StoredFile:
    file_id: str
    file_unique_id: str
    file_path: str
    content: bytes


@dataclass
class _Poller:
    """A getUpdates request waiting for updates."""

    terminated: bool = False


@dataclass
class _OkResult:
    """A successful result with the optional "description" that some methods add."""

    result: Any
    description: str | None = None


# Request parameters: PTB sends forms whose non-string values are JSON-encoded.


def _param_str(params: dict[str, Any], name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode()
    return value if isinstance(value, str) else json.dumps(value)


def _param_int(params: dict[str, Any], name: str) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise bad_request(f"invalid {name} specified")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise bad_request(f"invalid {name} specified") from None


def _param_float(params: dict[str, Any], name: str) -> float | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise bad_request(f"invalid {name} specified") from None


def _param_bool(params: dict[str, Any], name: str) -> bool:
    value = params.get(name)
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    return str(value).lower() in ("true", "1")


def _param_json(params: dict[str, Any], name: str) -> Any:
    value = params.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise bad_request(f"can't parse {name} JSON object") from None
    return value


async def _read_params(request: web.Request) -> dict[str, Any]:
    """Collect the parameters from the query string and a JSON, urlencoded or multipart body."""
    params: dict[str, Any] = dict(request.query)
    if not request.can_read_body:
        return params
    if request.content_type == "application/json":
        try:
            body = await request.json()
        except json.JSONDecodeError:
            raise bad_request("can't parse JSON request body") from None
        if not isinstance(body, dict):
            raise bad_request("the JSON request body must be an object")
        params.update(body)
    elif request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.post()
        for name, value in form.items():
            params[name] = value if isinstance(value, str) else value.file.read()
    return params


# The server


class TelegramStandin:
    """The stand-in Bot API server; ``async with`` starts it on an ephemeral port and stops it.

    ``token`` is the only token accepted; its number before ":" is the bot's user
    id, as in real tokens. Webhook deliveries that get no 2xx response are
    retried ``webhook_max_attempts`` times in all, ``webhook_retry_delay``
    seconds apart, then dropped. At most ``webhook_concurrency`` deliveries run
    at once, and never more than the webhook's max_connections. With the
    default of 1, updates arrive one at a time in update_id order.
    NOTE: the Bot API says only that Telegram gives up "after a reasonable
    amount of attempts"; this short schedule keeps tests fast.
    """

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        bot_username: str = "mindharbor_test_bot",
        bot_first_name: str = "MindHarbor",
        can_join_groups: bool = True,
        can_read_all_group_messages: bool = False,
        supports_inline_queries: bool = False,
        webhook_max_attempts: int = 3,
        webhook_retry_delay: float = 0.05,
        webhook_timeout: float = 10.0,
        webhook_concurrency: int = 1,
    ) -> None:
        if not _TOKEN_FORMAT.match(token):
            raise ValueError(f"Invalid bot token {token!r}: expected '<digits>:<letters>'.")
        self.token = token
        self.bot_username = bot_username
        self.bot_user: dict[str, Any] = {
            "id": int(token.split(":", 1)[0]),
            "is_bot": True,
            "first_name": bot_first_name,
            "username": bot_username,
            "can_join_groups": can_join_groups,
            "can_read_all_group_messages": can_read_all_group_messages,
            "supports_inline_queries": supports_inline_queries,
            "can_connect_to_business": False,
            "has_main_web_app": False,
        }
        self.webhook_max_attempts = webhook_max_attempts
        self.webhook_retry_delay = webhook_retry_delay
        self.webhook_timeout = webhook_timeout
        self.webhook_concurrency = webhook_concurrency

        # What the bot did, in order.
        self.calls: list[ApiCall] = []
        self.sent: list[SentMessage] = []
        self.chat_actions: list[ChatAction] = []
        # Bot commands by (scope key, language code); see ``scope_key``.
        self.commands: dict[tuple[str, str], list[dict[str, str]]] = {}
        self.webhook: WebhookConfig | None = None
        self.deliveries: list[Delivery] = []
        self.answered_callback_queries: list[dict[str, Any]] = []
        self.left_chats: list[int] = []

        # Every update enqueued, including the ones dropped by allowed_updates.
        self.updates: list[dict[str, Any]] = []
        # Updates that the allowed_updates setting kept out of the queue.
        self.filtered_updates: list[dict[str, Any]] = []
        self.chats: dict[int, dict[str, Any]] = {}
        self.files: dict[str, StoredFile] = {}

        self._pending: deque[dict[str, Any]] = deque()
        self._allowed_updates: frozenset[str] = ALL_UPDATE_TYPES - OPT_IN_UPDATE_TYPES
        self._update_ids = itertools.count(1)
        self._file_numbers = itertools.count(1)
        self._callback_ids = itertools.count(1)
        self._message_ids: dict[int, itertools.count[int]] = {}
        self._messages: dict[tuple[int, int], dict[str, Any]] = {}
        self._sent_by_key: dict[tuple[int, int], SentMessage] = {}
        self._callback_queries: set[str] = set()
        self._faults: dict[str, deque[Fault]] = {}
        self._blocked: dict[int, ApiError] = {}
        self._pollers: list[_Poller] = []
        self._webhook_error: tuple[int, str] | None = None
        self._webhook_tasks: list[asyncio.Task[None]] = []
        self._webhook_session: aiohttp.ClientSession | None = None
        self._in_flight: set[int] = set()
        self._changed = asyncio.Event()
        self._closing = False
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

        self._methods: dict[str, Callable[[dict[str, Any]], Any]] = {
            name.lower(): handler
            for name, handler in {
                "getMe": self._get_me,
                "getUpdates": self._get_updates,
                "setWebhook": self._set_webhook,
                "deleteWebhook": self._delete_webhook,
                "getWebhookInfo": self._get_webhook_info,
                "sendMessage": self._send_message,
                "editMessageText": self._edit_message_text,
                "deleteMessage": self._delete_message,
                "sendChatAction": self._send_chat_action,
                "setMyCommands": self._set_my_commands,
                "getMyCommands": self._get_my_commands,
                "deleteMyCommands": self._delete_my_commands,
                "answerCallbackQuery": self._answer_callback_query,
                "leaveChat": self._leave_chat,
                "getChat": self._get_chat,
                "getFile": self._get_file,
            }.items()
        }

    # Lifecycle

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("The stand-in is not started; use it in an `async with` block.")
        return f"http://127.0.0.1:{self._port}"

    @property
    def base_url(self) -> str:
        """The value for PTB's ``base_url``: the token is appended to it."""
        return f"{self.url}/bot"

    @property
    def base_file_url(self) -> str:
        """The value for PTB's ``base_file_url``, under which getFile's file_path is served."""
        return f"{self.url}/file/bot"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._handle_api)
        app.router.add_route("GET", "/file/bot{token}/{file_path:.+}", self._handle_file)
        app.router.add_route("*", "/{tail:.*}", self._handle_unknown_path)
        # handler_cancellation ends a long poll as soon as its client disconnects.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None
        )
        await self._runner.setup()
        # Port 0 lets the kernel pick a free ephemeral port.
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]
        logger.info("Telegram stand-in listening on %s", self.url)

    async def close(self) -> None:
        self._closing = True
        self._notify()
        await self._stop_webhook_delivery()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        logger.info("Telegram stand-in stopped")

    async def __aenter__(self) -> TelegramStandin:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # Scripted faults

    def fail_next(self, method: str, *faults: Fault) -> None:
        """Make the next requests to ``method`` fail with ``faults``, one per request, in order."""
        self._faults.setdefault(method.lower(), deque()).extend(faults)

    def clear_faults(self) -> None:
        self._faults.clear()
        self._blocked.clear()

    def block_chat(self, chat_id: int, error: ApiError | None = None) -> None:
        """Reject every later send, edit, delete or chat action in ``chat_id`` with a 403.

        The default error is "bot was blocked by the user" for private chats and
        "bot was kicked from the group chat" for groups (negative ids).
        """
        if error is None:
            reason = (
                "bot was blocked by the user"
                if chat_id > 0
                else "bot was kicked from the group chat"
            )
            error = forbidden(reason)
        self._blocked[chat_id] = error

    def unblock_chat(self, chat_id: int) -> None:
        self._blocked.pop(chat_id, None)

    # Chats and updates

    def add_private_chat(self, user: TgUser = DEFAULT_USER) -> dict[str, Any]:
        chat: dict[str, Any] = {"id": user.id, "type": "private", "first_name": user.first_name}
        if user.last_name is not None:
            chat["last_name"] = user.last_name
        if user.username is not None:
            chat["username"] = user.username
        self.chats[user.id] = chat
        return copy.deepcopy(chat)

    def add_group_chat(
        self,
        chat_id: int = DEFAULT_GROUP_CHAT_ID,
        title: str = "MindHarbor test group",
        *,
        chat_type: str = "supergroup",
    ) -> dict[str, Any]:
        """Register a "group", "supergroup" or "channel" chat (ids are negative)."""
        if chat_type not in ("group", "supergroup", "channel"):
            raise ValueError(f"Invalid chat_type {chat_type!r}: use group, supergroup or channel.")
        chat = {"id": chat_id, "type": chat_type, "title": title}
        self.chats[chat_id] = chat
        return copy.deepcopy(chat)

    def enqueue_update(self, update_type: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Add an update with the next update_id and return a copy of it.

        As on Telegram, an update whose type the current allowed_updates setting
        excludes is not queued; it goes to ``filtered_updates``.
        """
        if update_type not in ALL_UPDATE_TYPES:
            raise ValueError(f"Unknown update type {update_type!r}.")
        update = {"update_id": next(self._update_ids), update_type: copy.deepcopy(payload)}
        self.updates.append(update)
        if update_type in self._allowed_updates:
            self._pending.append(update)
        else:
            self.filtered_updates.append(update)
        self._notify()
        return copy.deepcopy(update)

    def enqueue_text(
        self,
        text: str,
        *,
        user: TgUser = DEFAULT_USER,
        chat_id: int | None = None,
        entities: list[dict[str, Any]] | None = None,
        reply_to: dict[str, Any] | SentMessage | int | None = None,
    ) -> dict[str, Any]:
        """Enqueue a text message from ``user`` in ``chat_id`` (their private chat by default).

        Without ``entities``, the commands, mentions, hashtags and URLs in the
        text get entities as Telegram adds them. ``reply_to`` is a message, a
        SentMessage or a message id in the same chat.
        """
        content: dict[str, Any] = {"text": text}
        found = detect_entities(text) if entities is None else entities
        if found:
            content["entities"] = found
        return self._enqueue_message(content, user=user, chat_id=chat_id, reply_to=reply_to)

    def enqueue_private_text(
        self,
        text: str,
        *,
        user: TgUser = DEFAULT_USER,
        entities: list[dict[str, Any]] | None = None,
        reply_to: dict[str, Any] | SentMessage | int | None = None,
    ) -> dict[str, Any]:
        return self.enqueue_text(text, user=user, entities=entities, reply_to=reply_to)

    def enqueue_group_text(
        self,
        text: str,
        *,
        user: TgUser = DEFAULT_USER,
        chat_id: int = DEFAULT_GROUP_CHAT_ID,
        chat_type: str = "supergroup",
        title: str = "MindHarbor test group",
        entities: list[dict[str, Any]] | None = None,
        reply_to: dict[str, Any] | SentMessage | int | None = None,
    ) -> dict[str, Any]:
        """Enqueue a text message in a group, registering the group when it is new.

        Write ``f"@{server.bot_username} ..."`` for a mention or
        ``f"/help@{server.bot_username}"`` for a command; ``reply_to`` a
        SentMessage for a reply to the bot. Pass a ``TgUser`` with
        ``is_bot=True`` for a message from another bot.
        """
        if chat_id not in self.chats:
            self.add_group_chat(chat_id, title, chat_type=chat_type)
        return self.enqueue_text(
            text, user=user, chat_id=chat_id, entities=entities, reply_to=reply_to
        )

    def enqueue_edited_text(self, message: dict[str, Any], text: str) -> dict[str, Any]:
        """Enqueue an edited_message update: ``message`` (a message dict) with new text."""
        chat_id = message["chat"]["id"]
        stored = self._messages.get((chat_id, message["message_id"]), message)
        edited = copy.deepcopy(stored)
        edited["text"] = text
        edited["edit_date"] = int(time.time())
        edited.pop("entities", None)
        found = detect_entities(text)
        if found:
            edited["entities"] = found
        self._messages[(chat_id, edited["message_id"])] = edited
        return self.enqueue_update("edited_message", edited)

    def enqueue_photo(
        self,
        *,
        caption: str | None = None,
        user: TgUser = DEFAULT_USER,
        chat_id: int | None = None,
        content: bytes = b"\xff\xd8\xff\xe0standin-jpeg",
    ) -> dict[str, Any]:
        """Enqueue a photo message, with a caption when given; the photo has two sizes."""
        small = self._store_file("photos", "jpg", content)
        large = self._store_file("photos", "jpg", content)
        photo = [
            {**self._file_fields(small), "width": 90, "height": 67},
            {**self._file_fields(large), "width": 800, "height": 600},
        ]
        message_content: dict[str, Any] = {"photo": photo}
        self._add_caption(message_content, caption)
        return self._enqueue_message(message_content, user=user, chat_id=chat_id)

    def enqueue_sticker(
        self, *, emoji: str = "🙂", user: TgUser = DEFAULT_USER, chat_id: int | None = None
    ) -> dict[str, Any]:
        stored = self._store_file("stickers", "webp", b"RIFF\x00\x00\x00\x00WEBP")
        sticker = {
            **self._file_fields(stored),
            "type": "regular",
            "width": 512,
            "height": 512,
            "is_animated": False,
            "is_video": False,
            "emoji": emoji,
        }
        return self._enqueue_message({"sticker": sticker}, user=user, chat_id=chat_id)

    def enqueue_voice(
        self,
        *,
        duration: int = 3,
        user: TgUser = DEFAULT_USER,
        chat_id: int | None = None,
        content: bytes = b"OggS\x00standin-voice",
    ) -> dict[str, Any]:
        stored = self._store_file("voice", "oga", content)
        voice = {**self._file_fields(stored), "duration": duration, "mime_type": "audio/ogg"}
        return self._enqueue_message({"voice": voice}, user=user, chat_id=chat_id)

    def enqueue_document(
        self,
        *,
        file_name: str = "notes.txt",
        mime_type: str = "text/plain",
        content: bytes = b"standin document\n",
        caption: str | None = None,
        user: TgUser = DEFAULT_USER,
        chat_id: int | None = None,
    ) -> dict[str, Any]:
        extension = file_name.rsplit(".", 1)[-1] if "." in file_name else "bin"
        stored = self._store_file("documents", extension, content)
        document = {**self._file_fields(stored), "file_name": file_name, "mime_type": mime_type}
        message_content: dict[str, Any] = {"document": document}
        self._add_caption(message_content, caption)
        return self._enqueue_message(message_content, user=user, chat_id=chat_id)

    def enqueue_location(
        self,
        latitude: float = 52.52,
        longitude: float = 13.405,
        *,
        user: TgUser = DEFAULT_USER,
        chat_id: int | None = None,
    ) -> dict[str, Any]:
        location = {"latitude": latitude, "longitude": longitude}
        return self._enqueue_message({"location": location}, user=user, chat_id=chat_id)

    def enqueue_channel_post(
        self,
        text: str,
        *,
        chat_id: int = DEFAULT_CHANNEL_CHAT_ID,
        title: str = "MindHarbor news",
    ) -> dict[str, Any]:
        """Enqueue a channel_post: it has ``sender_chat`` and no ``from``, as on Telegram."""
        if chat_id not in self.chats:
            self.add_group_chat(chat_id, title, chat_type="channel")
        chat = self.chats[chat_id]
        message: dict[str, Any] = {
            "message_id": self._next_message_id(chat_id),
            "sender_chat": copy.deepcopy(chat),
            "date": int(time.time()),
            "chat": copy.deepcopy(chat),
            "text": text,
        }
        found = detect_entities(text)
        if found:
            message["entities"] = found
        self._messages[(chat_id, message["message_id"])] = message
        return self.enqueue_update("channel_post", message)

    def enqueue_callback_query(
        self,
        data: str,
        *,
        message: dict[str, Any] | SentMessage,
        user: TgUser = DEFAULT_USER,
    ) -> dict[str, Any]:
        """Enqueue a press on an inline button of ``message`` carrying callback ``data``."""
        message_dict = message.message if isinstance(message, SentMessage) else message
        query_id = f"{self.bot_user['id']}{next(self._callback_ids):08d}"
        self._callback_queries.add(query_id)
        query = {
            "id": query_id,
            "from": user.to_dict(),
            "message": copy.deepcopy(message_dict),
            "chat_instance": str(message_dict["chat"]["id"]),
            "data": data,
        }
        return self.enqueue_update("callback_query", query)

    @property
    def pending_updates(self) -> list[dict[str, Any]]:
        """Updates not yet confirmed by a getUpdates offset or delivered to the webhook."""
        return copy.deepcopy(list(self._pending))

    # Waiting for the bot

    async def wait_for(
        self,
        condition: Callable[[], T],
        *,
        timeout: float = 5.0,
        description: str = "the condition",
    ) -> T:
        """Return the first truthy value of ``condition()``, checked after every change.

        Raises TimeoutError naming ``description`` when ``timeout`` seconds pass first.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            changed = self._changed
            value = condition()
            if value:
                return value
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"Timed out after {timeout} s waiting for {description}.")
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                pass

    async def wait_for_messages(
        self, chat_id: int, count: int = 1, *, timeout: float = 5.0
    ) -> list[SentMessage]:
        """Wait until the bot has sent ``count`` messages to ``chat_id``; return all sent there."""

        def messages_in_chat() -> list[SentMessage]:
            found = [message for message in self.sent if message.chat_id == chat_id]
            return found if len(found) >= count else []

        try:
            return await self.wait_for(
                messages_in_chat,
                timeout=timeout,
                description=f"{count} message(s) in chat {chat_id}",
            )
        except TimeoutError as error:
            seen = [message.plain_text for message in self.sent if message.chat_id == chat_id]
            raise TimeoutError(f"{error} Messages sent there: {seen!r}") from None

    async def wait_for_chat_action(
        self, chat_id: int, action: str = "typing", *, timeout: float = 5.0
    ) -> ChatAction:
        def matching() -> ChatAction | None:
            return next(
                (a for a in self.chat_actions if a.chat_id == chat_id and a.action == action),
                None,
            )

        return await self.wait_for(
            matching, timeout=timeout, description=f"chat action {action!r} in chat {chat_id}"
        )

    async def wait_for_deliveries(self, count: int, *, timeout: float = 5.0) -> list[Delivery]:
        """Wait until ``count`` webhook POSTs (attempts, not updates) are recorded."""

        def enough() -> list[Delivery]:
            return list(self.deliveries) if len(self.deliveries) >= count else []

        return await self.wait_for(
            enough, timeout=timeout, description=f"{count} webhook deliveries"
        )

    async def wait_until_consumed(self, *, timeout: float = 5.0) -> None:
        """Wait until every queued update is confirmed by getUpdates or delivered to the webhook."""
        await self.wait_for(
            lambda: not self._pending, timeout=timeout, description="the update queue to empty"
        )

    # Looking up what the bot did

    def sent_to(self, chat_id: int) -> list[SentMessage]:
        return [message for message in self.sent if message.chat_id == chat_id]

    def commands_for(
        self, language_code: str = "", scope: dict[str, Any] | None = None
    ) -> list[dict[str, str]]:
        """Return the commands set for a scope (default scope when None) and language."""
        return list(self.commands.get((self.scope_key(scope), language_code), []))

    @staticmethod
    def scope_key(scope: dict[str, Any] | None) -> str:
        """Return the key of a BotCommandScope in ``commands``: its type, then any ids.

        For example "default", "all_private_chats", "chat:-100123" or "chat_member:-100123:42".
        """
        if not scope:
            return "default"
        parts = [str(scope["type"])]
        for name in ("chat_id", "user_id"):
            if name in scope:
                parts.append(str(scope[name]))
        return ":".join(parts)

    async def post_raw_update(
        self,
        update: dict[str, Any],
        *,
        url: str | None = None,
        secret_token: str | None = None,
    ) -> int:
        """POST ``update`` to ``url`` (the webhook's by default) and return the HTTP status.

        The secret header carries ``secret_token`` exactly, and is left out when
        it is None, to test how the bot treats wrong or missing secrets. The POST
        is not recorded in ``deliveries``.
        """
        if url is None:
            if self.webhook is None:
                raise RuntimeError("No webhook is set; pass url= or let the bot call setWebhook.")
            url = self.webhook.url
        _check_loopback(url)
        headers = {"Content-Type": "application/json"}
        if secret_token is not None:
            headers[SECRET_TOKEN_HEADER] = secret_token
        timeout = aiohttp.ClientTimeout(total=self.webhook_timeout)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(url, data=json.dumps(update), headers=headers) as response,
        ):
            await response.read()
            return response.status

    # HTTP handlers

    async def _handle_api(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        call = ApiCall(method=method, params={})
        self.calls.append(call)
        try:
            call.params = await _read_params(request)
            response = await self._dispatch(request.match_info["token"], method, call.params)
        except ApiError as error:
            response = error.to_response()
            call.description = error.description
        except _ConnectionDropped:
            call.description = "connection dropped"
            if request.transport is not None:
                request.transport.close()
            # Nothing reaches the client: its connection is already closed.
            response = web.Response(status=200)
        call.status = response.status
        self._notify()
        return response

    async def _handle_file(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != self.token:
            return _unauthorized().to_response()
        file_path = request.match_info["file_path"]
        stored = next((f for f in self.files.values() if f.file_path == file_path), None)
        if stored is None:
            return _not_found().to_response()
        return web.Response(body=stored.content, content_type="application/octet-stream")

    async def _handle_unknown_path(self, request: web.Request) -> web.StreamResponse:
        return _not_found().to_response()

    async def _dispatch(self, token: str, method: str, params: dict[str, Any]) -> web.Response:
        # Telegram returns 404 for a malformed token and 401 for a well-formed wrong one.
        if not _TOKEN_FORMAT.match(token):
            raise _not_found()
        if token != self.token:
            raise _unauthorized()

        faults = self._faults.get(method.lower())
        if faults:
            fault = faults.popleft()
            if isinstance(fault, ApiError):
                raise fault
            if isinstance(fault, DropConnection):
                raise _ConnectionDropped
            await asyncio.sleep(fault.seconds)

        handler = self._methods.get(method.lower())
        if handler is None:
            raise _not_found()
        result = handler(params)
        if asyncio.iscoroutine(result):
            result = await result
        ok = result if isinstance(result, _OkResult) else _OkResult(result)
        payload: dict[str, Any] = {"ok": True, "result": ok.result}
        if ok.description:
            payload["description"] = ok.description
        return web.json_response(payload)

    def _notify(self) -> None:
        """Wake every waiter: the event of this state is set and a new one replaces it."""
        self._changed.set()
        self._changed = asyncio.Event()

    # Bot API methods: identity and updates

    def _get_me(self, params: dict[str, Any]) -> dict[str, Any]:
        return copy.deepcopy(self.bot_user)

    async def _get_updates(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        if self.webhook is not None:
            raise conflict_webhook_active()
        offset = _param_int(params, "offset") or 0
        limit = min(max(_param_int(params, "limit") or MAX_UPDATES_LIMIT, 1), MAX_UPDATES_LIMIT)
        timeout = max(_param_float(params, "timeout") or 0.0, 0.0)
        allowed = _param_json(params, "allowed_updates")
        if allowed is not None:
            self._set_allowed_updates(allowed)

        if offset > 0:
            while self._pending and self._pending[0]["update_id"] < offset:
                self._pending.popleft()
        elif offset < 0:
            while len(self._pending) > -offset:
                self._pending.popleft()

        # A newer request ends any older one that is still waiting.
        for poller in self._pollers:
            poller.terminated = True
        poller = _Poller()
        self._pollers.append(poller)
        self._notify()
        try:
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                changed = self._changed
                if poller.terminated:
                    raise conflict_terminated()
                if self._pending or self._closing:
                    return copy.deepcopy(list(self._pending)[:limit])
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    return []
                try:
                    await asyncio.wait_for(changed.wait(), remaining)
                except TimeoutError:
                    pass
        finally:
            self._pollers.remove(poller)

    def _set_allowed_updates(self, allowed: Any) -> None:
        if not isinstance(allowed, list) or not all(isinstance(kind, str) for kind in allowed):
            raise bad_request("can't parse allowed_updates JSON array")
        known = [kind for kind in allowed if kind in ALL_UPDATE_TYPES]
        # The Bot API does not document how it treats unknown type names, so they are ignored.
        self._allowed_updates = (
            frozenset(known) if known else ALL_UPDATE_TYPES - OPT_IN_UPDATE_TYPES
        )

    # Bot API methods: webhooks

    async def _set_webhook(self, params: dict[str, Any]) -> _OkResult:
        url = _param_str(params, "url")
        if url is None:
            raise bad_request("url is empty")
        if url == "":
            return await self._delete_webhook(params)
        try:
            _check_loopback(url)
        except ValueError as error:
            raise bad_request(f"bad webhook: {error}") from None

        secret_token = _param_str(params, "secret_token") or None
        if secret_token is not None and not _SECRET_TOKEN_FORMAT.match(secret_token):
            # NOTE: the wording of this error is a guess; the Bot API documents only the format.
            raise bad_request("secret token contains unallowed characters")
        allowed = _param_json(params, "allowed_updates")
        if allowed is not None:
            self._set_allowed_updates(allowed)
        max_connections = min(max(_param_int(params, "max_connections") or 40, 1), 100)
        drop_pending = _param_bool(params, "drop_pending_updates")
        config = WebhookConfig(
            url=url,
            secret_token=secret_token,
            allowed_updates=allowed,
            max_connections=max_connections,
            drop_pending_updates=drop_pending,
            ip_address=_param_str(params, "ip_address"),
        )
        if drop_pending:
            self._pending.clear()
        if config == self.webhook:
            return _OkResult(True, "Webhook is already set")
        await self._stop_webhook_delivery()
        self.webhook = config
        self._webhook_error = None
        self._start_webhook_delivery(config)
        return _OkResult(True, "Webhook was set")

    async def _delete_webhook(self, params: dict[str, Any]) -> _OkResult:
        if _param_bool(params, "drop_pending_updates"):
            self._pending.clear()
        if self.webhook is None:
            return _OkResult(True, "Webhook is already deleted")
        await self._stop_webhook_delivery()
        self.webhook = None
        return _OkResult(True, "Webhook was deleted")

    def _get_webhook_info(self, params: dict[str, Any]) -> dict[str, Any]:
        info: dict[str, Any] = {
            "url": self.webhook.url if self.webhook else "",
            "has_custom_certificate": False,
            "pending_update_count": len(self._pending),
        }
        if self.webhook is not None:
            info["max_connections"] = self.webhook.max_connections
            if self.webhook.ip_address:
                info["ip_address"] = self.webhook.ip_address
            if self.webhook.allowed_updates is not None:
                info["allowed_updates"] = list(self.webhook.allowed_updates)
        if self._webhook_error is not None:
            info["last_error_date"], info["last_error_message"] = self._webhook_error
        return info

    def _start_webhook_delivery(self, config: WebhookConfig) -> None:
        timeout = aiohttp.ClientTimeout(total=self.webhook_timeout)
        self._webhook_session = aiohttp.ClientSession(timeout=timeout)
        workers = max(1, min(self.webhook_concurrency, config.max_connections))
        self._webhook_tasks = [
            asyncio.create_task(self._webhook_worker(config), name=f"webhook-worker-{number}")
            for number in range(workers)
        ]
        logger.info("Webhook delivery started to %s with %d worker(s)", config.url, workers)

    async def _stop_webhook_delivery(self) -> None:
        # A webhook reply that calls setWebhook or deleteWebhook runs inside a worker;
        # that worker must not wait for itself, and it stops once self.webhook changes.
        current = asyncio.current_task()
        tasks = [task for task in self._webhook_tasks if task is not current]
        self._webhook_tasks = []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._in_flight.clear()
        if self._webhook_session is not None:
            await self._webhook_session.close()
            self._webhook_session = None

    async def _webhook_worker(self, config: WebhookConfig) -> None:
        while self.webhook is config and not self._closing:
            changed = self._changed
            update = next((u for u in self._pending if u["update_id"] not in self._in_flight), None)
            if update is None:
                await changed.wait()
                continue
            self._in_flight.add(update["update_id"])
            try:
                await self._deliver(config, update)
            finally:
                self._in_flight.discard(update["update_id"])
            # Delivered or given up: either way the update leaves the queue.
            if update in self._pending:
                self._pending.remove(update)
            self._notify()

    async def _deliver(self, config: WebhookConfig, update: dict[str, Any]) -> bool:
        """POST one update, retrying as configured; return whether the webhook accepted it."""
        assert self._webhook_session is not None
        headers = {"Content-Type": "application/json"}
        if config.secret_token is not None:
            headers[SECRET_TOKEN_HEADER] = config.secret_token
        body = json.dumps(update)
        for attempt in range(1, self.webhook_max_attempts + 1):
            status: int | None = None
            error: str | None = None
            reply: bytes = b""
            content_type = ""
            try:
                async with self._webhook_session.post(
                    config.url, data=body, headers=headers
                ) as response:
                    status = response.status
                    content_type = response.content_type
                    reply = await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = str(exc) or type(exc).__name__
            self.deliveries.append(
                Delivery(
                    update_id=update["update_id"],
                    attempt=attempt,
                    url=config.url,
                    status=status,
                    error=error,
                    secret_token_sent=config.secret_token,
                    at=time.monotonic(),
                )
            )
            self._notify()
            if status is not None and 200 <= status < 300:
                if reply:
                    await self._run_webhook_reply(content_type, reply)
                return True
            message = error if status is None else f"Wrong response from the webhook: {status}"
            self._webhook_error = (int(time.time()), message)
            logger.warning(
                "Webhook delivery of update %d failed (attempt %d of %d): %s",
                update["update_id"],
                attempt,
                self.webhook_max_attempts,
                message,
            )
            if attempt < self.webhook_max_attempts:
                await asyncio.sleep(self.webhook_retry_delay)
        logger.warning("Dropped update %d after %d attempts", update["update_id"], attempt)
        return False

    async def _run_webhook_reply(self, content_type: str, reply: bytes) -> None:
        """Run a Bot API method sent back in a JSON or urlencoded webhook response.

        Telegram allows this and gives the bot no result, so errors are only
        recorded and logged.
        NOTE: Telegram also accepts multipart/form-data here; the stand-in ignores it.
        """
        params: Any = None
        if content_type == "application/json":
            try:
                params = json.loads(reply)
            except json.JSONDecodeError:
                return
        elif content_type == "application/x-www-form-urlencoded":
            params = dict(urllib.parse.parse_qsl(reply.decode()))
        if not isinstance(params, dict) or not isinstance(params.get("method"), str):
            return
        method = params.pop("method")
        call = ApiCall(method=method, params=params, source="webhook-reply")
        self.calls.append(call)
        try:
            response = await self._dispatch(self.token, method, params)
            call.status = response.status
        except ApiError as error:
            call.status, call.description = error.status, error.description
            logger.info("Webhook reply %s failed: %s", method, error.description)
        except _ConnectionDropped:
            call.description = "connection dropped"

    # Bot API methods: messages

    def _send_message(self, params: dict[str, Any]) -> dict[str, Any]:
        chat = self._chat_for(params)
        parsed = self._parse_text(params)
        reply_to_message = self._reply_target(params, chat["id"])
        reply_markup = _param_json(params, "reply_markup")

        message_id = self._next_message_id(chat["id"])
        message: dict[str, Any] = {
            "message_id": message_id,
            "from": copy.deepcopy(self.bot_user),
            "chat": copy.deepcopy(chat),
            "date": int(time.time()),
            "text": parsed.text,
        }
        thread_id = _param_int(params, "message_thread_id")
        if thread_id is not None:
            message["message_thread_id"] = thread_id
        if parsed.entities:
            message["entities"] = parsed.entities
        if reply_to_message is not None:
            message["reply_to_message"] = reply_to_message
        if reply_markup and "inline_keyboard" in reply_markup:
            message["reply_markup"] = reply_markup
        self._messages[(chat["id"], message_id)] = message

        record = SentMessage(
            chat_id=chat["id"],
            message_id=message_id,
            text=_param_str(params, "text") or "",
            parse_mode=_param_str(params, "parse_mode") or None,
            plain_text=parsed.text,
            entities=parsed.entities,
            reply_to_message_id=reply_to_message["message_id"] if reply_to_message else None,
            reply_markup=reply_markup,
            link_preview_options=_param_json(params, "link_preview_options"),
            message_thread_id=thread_id,
            disable_notification=_param_bool(params, "disable_notification"),
            params=dict(params),
            message=copy.deepcopy(message),
        )
        self.sent.append(record)
        self._sent_by_key[(chat["id"], message_id)] = record
        return copy.deepcopy(message)

    def _edit_message_text(self, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("inline_message_id"):
            raise bad_request("the stand-in does not implement inline_message_id")
        chat = self._chat_for(params)
        message_id = _param_int(params, "message_id")
        if message_id is None:
            raise bad_request("message identifier is not specified")
        stored = self._messages.get((chat["id"], message_id))
        if stored is None:
            raise bad_request("message to edit not found")
        if stored.get("from", {}).get("id") != self.bot_user["id"]:
            raise bad_request("message can't be edited")

        parsed = self._parse_text(params)
        reply_markup = _param_json(params, "reply_markup")
        unchanged = (
            stored.get("text") == parsed.text
            and stored.get("entities", []) == parsed.entities
            and stored.get("reply_markup") == reply_markup
        )
        if unchanged:
            raise bad_request(
                "message is not modified: specified new message content and reply markup are "
                "exactly the same as a current content and reply markup of the message"
            )

        stored["text"] = parsed.text
        stored["edit_date"] = int(time.time())
        stored.pop("entities", None)
        if parsed.entities:
            stored["entities"] = parsed.entities
        stored.pop("reply_markup", None)
        if reply_markup and "inline_keyboard" in reply_markup:
            stored["reply_markup"] = reply_markup

        record = self._sent_by_key.get((chat["id"], message_id))
        if record is not None:
            record.previous_texts.append(record.plain_text)
            record.text = _param_str(params, "text") or ""
            record.parse_mode = _param_str(params, "parse_mode") or None
            record.plain_text = parsed.text
            record.entities = parsed.entities
            record.reply_markup = reply_markup
            record.message = copy.deepcopy(stored)
        return copy.deepcopy(stored)

    def _delete_message(self, params: dict[str, Any]) -> bool:
        chat = self._chat_for(params)
        message_id = _param_int(params, "message_id")
        if message_id is None or self._messages.pop((chat["id"], message_id), None) is None:
            raise bad_request("message to delete not found")
        record = self._sent_by_key.get((chat["id"], message_id))
        if record is not None:
            record.deleted = True
        return True

    def _send_chat_action(self, params: dict[str, Any]) -> bool:
        chat = self._chat_for(params)
        action = _param_str(params, "action")
        if action not in CHAT_ACTIONS:
            raise bad_request("wrong parameter action in request")
        self.chat_actions.append(
            ChatAction(
                chat_id=chat["id"],
                action=action,
                message_thread_id=_param_int(params, "message_thread_id"),
                at=time.monotonic(),
            )
        )
        return True

    def _parse_text(self, params: dict[str, Any]) -> ParsedText:
        """Parse ``text`` with its parse_mode or entities and check it as sendMessage does."""
        text = _param_str(params, "text")
        if not text:
            raise bad_request("message text is empty")
        entities = _param_json(params, "entities")
        parse_mode = (_param_str(params, "parse_mode") or "").lower()
        try:
            if entities:
                parsed = ParsedText(text, list(entities))
            elif parse_mode == "":
                parsed = ParsedText(text, [])
            elif parse_mode == "markdownv2":
                parsed = parse_markdown_v2(text)
            elif parse_mode == "html":
                parsed = parse_html(text)
            elif parse_mode == "markdown":
                # Telegram accepts the legacy Markdown style, but the stand-in does not parse it.
                raise bad_request("the stand-in does not implement parse_mode Markdown")
            else:
                raise bad_request("unsupported parse_mode")
        except EntityParseError as error:
            raise bad_request(f"can't parse entities: {error}") from None

        # NOTE: Telegram also trims leading and trailing white space; the stand-in
        # records the text untrimmed and only rejects text that is all white space.
        if not parsed.text.strip():
            raise bad_request("message text is empty")
        if utf16_length(parsed.text) > MAX_MESSAGE_LENGTH:
            raise bad_request("message is too long")
        return parsed

    def _reply_target(self, params: dict[str, Any], chat_id: int) -> dict[str, Any] | None:
        """Return the message to reply to, from reply_parameters or reply_to_message_id."""
        reply_parameters = _param_json(params, "reply_parameters")
        if reply_parameters is not None:
            if not isinstance(reply_parameters, dict) or "message_id" not in reply_parameters:
                raise bad_request("can't parse reply_parameters JSON object")
            message_id = int(reply_parameters["message_id"])
            target_chat = reply_parameters.get("chat_id", chat_id)
            allow_missing = bool(reply_parameters.get("allow_sending_without_reply", False))
        else:
            message_id_or_none = _param_int(params, "reply_to_message_id")
            if message_id_or_none is None:
                return None
            message_id = message_id_or_none
            target_chat = chat_id
            allow_missing = _param_bool(params, "allow_sending_without_reply")
        target = self._messages.get((int(target_chat), message_id))
        if target is None:
            if allow_missing:
                return None
            raise bad_request("message to be replied not found")
        replied = copy.deepcopy(target)
        replied.pop("reply_to_message", None)
        return replied

    # Bot API methods: commands and chats

    def _set_my_commands(self, params: dict[str, Any]) -> bool:
        commands = _param_json(params, "commands") or []
        if not isinstance(commands, list):
            raise bad_request("can't parse commands JSON array")
        # NOTE: only BOT_COMMAND_INVALID and the empty-description error are confirmed
        # Telegram wordings; the others below are the stand-in's.
        if len(commands) > MAX_BOT_COMMANDS:
            raise bad_request("too many commands")
        checked = []
        for command in commands:
            if not isinstance(command, dict):
                raise bad_request("can't parse BotCommand JSON object")
            name = str(command.get("command", ""))
            description = str(command.get("description", ""))
            if not _BOT_COMMAND_FORMAT.match(name):
                raise bad_request("BOT_COMMAND_INVALID")
            if not description.strip():
                raise bad_request("command description must be non-empty")
            if len(description) > 256:
                raise bad_request("command description is too long")
            checked.append({"command": name, "description": description})
        key = self._commands_key(params)
        if checked:
            self.commands[key] = checked
        else:
            self.commands.pop(key, None)
        return True

    def _get_my_commands(self, params: dict[str, Any]) -> list[dict[str, str]]:
        return copy.deepcopy(self.commands.get(self._commands_key(params), []))

    def _delete_my_commands(self, params: dict[str, Any]) -> bool:
        self.commands.pop(self._commands_key(params), None)
        return True

    def _commands_key(self, params: dict[str, Any]) -> tuple[str, str]:
        scope = _param_json(params, "scope")
        if scope is not None:
            scope_types = {
                "default": (),
                "all_private_chats": (),
                "all_group_chats": (),
                "all_chat_administrators": (),
                "chat": ("chat_id",),
                "chat_administrators": ("chat_id",),
                "chat_member": ("chat_id", "user_id"),
            }
            if not isinstance(scope, dict) or scope.get("type") not in scope_types:
                raise bad_request("unsupported bot command scope type")
            for name in scope_types[scope["type"]]:
                if name not in scope:
                    raise bad_request(f"{name} is empty")
        language_code = _param_str(params, "language_code") or ""
        if language_code and not _LANGUAGE_CODE_FORMAT.match(language_code):
            raise bad_request("invalid language code specified")
        key_scope = None if scope is None or scope.get("type") == "default" else scope
        return self.scope_key(key_scope), language_code

    def _answer_callback_query(self, params: dict[str, Any]) -> bool:
        query_id = _param_str(params, "callback_query_id")
        if query_id not in self._callback_queries:
            raise bad_request(
                "query is too old and response timeout expired or query ID is invalid"
            )
        self._callback_queries.discard(query_id)
        self.answered_callback_queries.append(dict(params))
        return True

    def _leave_chat(self, params: dict[str, Any]) -> bool:
        chat = self._chat_for(params, check_blocked=False)
        self.left_chats.append(chat["id"])
        return True

    def _get_chat(self, params: dict[str, Any]) -> dict[str, Any]:
        chat = self._chat_for(params, check_blocked=False)
        # accent_color_id, max_reaction_count and accepted_gift_types are required
        # fields of ChatFullInfo.
        gift_types = {
            "unlimited_gifts": False,
            "limited_gifts": False,
            "unique_gifts": False,
            "premium_subscription": False,
            "gifts_from_channels": False,
        }
        return {
            **copy.deepcopy(chat),
            "accent_color_id": 0,
            "max_reaction_count": 11,
            "accepted_gift_types": gift_types,
        }

    def _get_file(self, params: dict[str, Any]) -> dict[str, Any]:
        stored = self.files.get(_param_str(params, "file_id") or "")
        if stored is None:
            raise bad_request("invalid file_id")
        return {
            **self._file_fields(stored),
            "file_path": stored.file_path,
        }

    def _chat_for(self, params: dict[str, Any], *, check_blocked: bool = True) -> dict[str, Any]:
        """Return the chat that ``chat_id`` names (a number or an @username)."""
        raw = _param_str(params, "chat_id")
        if not raw:
            raise bad_request("chat_id is empty")
        chat: dict[str, Any] | None
        if raw.startswith("@"):
            chat = next((c for c in self.chats.values() if c.get("username") == raw[1:]), None)
        else:
            try:
                chat = self.chats.get(int(raw))
            except ValueError:
                chat = None
        if chat is None:
            raise bad_request("chat not found")
        if check_blocked and chat["id"] in self._blocked:
            raise self._blocked[chat["id"]]
        return chat

    # Message and file bookkeeping

    def _next_message_id(self, chat_id: int) -> int:
        counter = self._message_ids.setdefault(chat_id, itertools.count(1))
        return next(counter)

    def _enqueue_message(
        self,
        content: dict[str, Any],
        *,
        user: TgUser,
        chat_id: int | None,
        reply_to: dict[str, Any] | SentMessage | int | None = None,
    ) -> dict[str, Any]:
        if chat_id is None:
            chat_id = user.id
            if chat_id not in self.chats:
                self.add_private_chat(user)
        chat = self.chats.get(chat_id)
        if chat is None:
            raise ValueError(f"Chat {chat_id} is not registered; call add_group_chat first.")
        message: dict[str, Any] = {
            "message_id": self._next_message_id(chat_id),
            "from": user.to_dict(),
            "date": int(time.time()),
            "chat": copy.deepcopy(chat),
            **copy.deepcopy(content),
        }
        if reply_to is not None:
            message["reply_to_message"] = self._replied_message(chat_id, reply_to)
        self._messages[(chat_id, message["message_id"])] = message
        return self.enqueue_update("message", message)

    def _replied_message(
        self, chat_id: int, reply_to: dict[str, Any] | SentMessage | int
    ) -> dict[str, Any]:
        if isinstance(reply_to, SentMessage):
            key = (reply_to.chat_id, reply_to.message_id)
        elif isinstance(reply_to, int):
            key = (chat_id, reply_to)
        else:
            key = (reply_to["chat"]["id"], reply_to["message_id"])
        target = self._messages.get(key)
        if target is None:
            raise ValueError(f"No message {key[1]} in chat {key[0]} to reply to.")
        replied = copy.deepcopy(target)
        replied.pop("reply_to_message", None)
        return replied

    def _store_file(self, folder: str, extension: str, content: bytes) -> StoredFile:
        number = next(self._file_numbers)
        stored = StoredFile(
            file_id=f"standin-file-{number}",
            file_unique_id=f"standin-unique-{number}",
            file_path=f"{folder}/file_{number}.{extension}",
            content=content,
        )
        self.files[stored.file_id] = stored
        return stored

    @staticmethod
    def _file_fields(stored: StoredFile) -> dict[str, Any]:
        return {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_size": len(stored.content),
        }

    @staticmethod
    def _add_caption(content: dict[str, Any], caption: str | None) -> None:
        if caption is None:
            return
        content["caption"] = caption
        found = detect_entities(caption)
        if found:
            content["caption_entities"] = found


class _ConnectionDropped(Exception):
    """Raised inside the dispatcher to close the connection without a response."""


def _check_loopback(url: str) -> None:
    """Raise ValueError unless url is http(s) on a loopback host, the only place tests may reach.

    api.telegram.org requires HTTPS on port 443, 80, 88 or 8443. Like a local
    Bot API server, the stand-in accepts plain HTTP on any port, so that tests
    need no certificates.
    """
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or parsed.hostname not in _LOOPBACK_HOSTS:
        raise ValueError(f"the stand-in delivers only to http(s) URLs on 127.0.0.1, not {url!r}")
