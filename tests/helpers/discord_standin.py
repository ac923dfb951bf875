"""A stand-in Discord server (REST API v10 and gateway) on 127.0.0.1 for end-to-end tests.

discord.py 2.x runs against it as against Discord once it is pointed there::

    async with DiscordStandin() as server:
        with redirect_discord_py(server):
            client = discord.Client(intents=intents, guild_ready_timeout=0.05)
            await client.login(server.token)
            task = asyncio.create_task(client.connect())
            await server.wait_until_connected()
            ...
            await client.close()

``redirect_discord_py`` sets ``discord.http.Route.BASE`` to ``server.api_base`` and
``DiscordWebSocket.DEFAULT_GATEWAY`` to ``server.gateway_url``, and restores both.
Both are needed: discord.py 2.7's ``Client`` opens DEFAULT_GATEWAY without requesting
``GET /gateway/bot`` (only ``AutoShardedClient`` requests it), and it goes back to
DEFAULT_GATEWAY after an INVALID_SESSION. The REST routes for interactions and
webhooks use the same ``Route.BASE``.

It follows the Discord developer documentation (github.com/discord/discord-api-docs:
"Gateway", "Gateway Events", "Opcodes and Status Codes", "Rate Limits", "Receiving and
Responding", "Application Commands", "Message" and "Channel"). The gateway serves
``encoding=json`` with or without ``compress=zlib-stream``: every payload then goes out
as a binary frame from one zlib context per connection, flushed with Z_SYNC_FLUSH.
Dispatches honour the intents of each session, and message content is emptied by the
documented MESSAGE_CONTENT rule.

Tests send gateway events with ``send_message_create``, ``send_interaction_create`` and
``send_event``, read what the bot did from ``messages``, ``interaction_responses``,
``typing``, ``commands``, ``threads``, ``dm_channels``, ``calls`` and ``identify``, wait
with the ``wait_for*`` methods, and script REST failures with ``rate_limit_next`` and
``fail_next``. Known differences from Discord are marked ``NOTE:`` where they sit. The
larger ones: permissions come from roles alone (channel overwrites are ignored), and REST
calls never check them. The handshake rejects ``etf`` encoding and ``zstd-stream``.
Messages by users exist only as the tests dispatch them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime as dt
import hashlib
import json
import logging
import math
import re
import secrets
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import discord
import regex
import yarl
from aiohttp import BodyPartReader, WSMsgType, web
from discord.gateway import DiscordWebSocket
from discord.http import Route

logger = logging.getLogger(__name__)

T = TypeVar("T")

API_VERSION = 10
# Discord's snowflake epoch, the first millisecond of 2015 (UTC).
DISCORD_EPOCH_MS = 1_420_070_400_000

# Gateway intents ("Gateway" page, "List of Intents").
INTENT_GUILDS = 1 << 0
INTENT_GUILD_MEMBERS = 1 << 1
INTENT_GUILD_PRESENCES = 1 << 8
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_MESSAGE_CONTENT = 1 << 15
PRIVILEGED_INTENTS = INTENT_GUILD_MEMBERS | INTENT_GUILD_PRESENCES | INTENT_MESSAGE_CONTENT
# Every intent bit the documentation defines: 0 to 16, 20, 21, 24 and 25.
DEFINED_INTENTS = ((1 << 17) - 1) | (1 << 20) | (1 << 21) | (1 << 24) | (1 << 25)

# Application flags ("Application" resource).
APP_FLAG_GATEWAY_PRESENCE = 1 << 12
APP_FLAG_GATEWAY_PRESENCE_LIMITED = 1 << 13
APP_FLAG_GATEWAY_GUILD_MEMBERS = 1 << 14
APP_FLAG_GATEWAY_GUILD_MEMBERS_LIMITED = 1 << 15
APP_FLAG_GATEWAY_MESSAGE_CONTENT = 1 << 18
APP_FLAG_GATEWAY_MESSAGE_CONTENT_LIMITED = 1 << 19
APP_FLAG_APPLICATION_COMMAND_BADGE = 1 << 23

# Gateway opcodes.
OP_DISPATCH = 0
OP_HEARTBEAT = 1
OP_IDENTIFY = 2
OP_PRESENCE_UPDATE = 3
OP_VOICE_STATE_UPDATE = 4
OP_RESUME = 6
OP_RECONNECT = 7
OP_REQUEST_GUILD_MEMBERS = 8
OP_INVALID_SESSION = 9
OP_HELLO = 10
OP_HEARTBEAT_ACK = 11
OP_REQUEST_SOUNDBOARD_SOUNDS = 31

# Gateway close event codes and their documented descriptions.
CLOSE_UNKNOWN_ERROR = 4000
CLOSE_UNKNOWN_OPCODE = 4001
CLOSE_DECODE_ERROR = 4002
CLOSE_NOT_AUTHENTICATED = 4003
CLOSE_AUTHENTICATION_FAILED = 4004
CLOSE_ALREADY_AUTHENTICATED = 4005
CLOSE_INVALID_SEQ = 4007
CLOSE_RATE_LIMITED = 4008
CLOSE_INVALID_SHARD = 4010
CLOSE_INVALID_API_VERSION = 4012
CLOSE_INVALID_INTENTS = 4013
CLOSE_DISALLOWED_INTENTS = 4014
CLOSE_REASONS = {
    CLOSE_UNKNOWN_ERROR: "Unknown error",
    CLOSE_UNKNOWN_OPCODE: "Unknown opcode",
    CLOSE_DECODE_ERROR: "Decode error",
    CLOSE_NOT_AUTHENTICATED: "Not authenticated",
    CLOSE_AUTHENTICATION_FAILED: "Authentication failed",
    CLOSE_ALREADY_AUTHENTICATED: "Already authenticated",
    CLOSE_INVALID_SEQ: "Invalid seq",
    CLOSE_RATE_LIMITED: "Rate limited",
    CLOSE_INVALID_SHARD: "Invalid shard",
    CLOSE_INVALID_API_VERSION: "Invalid API version",
    CLOSE_INVALID_INTENTS: "Invalid intent(s)",
    CLOSE_DISALLOWED_INTENTS: "Disallowed intent(s)",
}
# A client that closes with one of these ends its session ("Initiating a Disconnect").
SESSION_ENDING_CLOSE_CODES = frozenset({1000, 1001})

# Limits from the "Gateway" page: payload size and send rate per connection.
MAX_GATEWAY_PAYLOAD_BYTES = 4096
MAX_GATEWAY_EVENTS_PER_MINUTE = 120

# Channel types.
CHANNEL_GUILD_TEXT = 0
CHANNEL_DM = 1
CHANNEL_GUILD_VOICE = 2
CHANNEL_GUILD_CATEGORY = 4
CHANNEL_GUILD_ANNOUNCEMENT = 5
CHANNEL_ANNOUNCEMENT_THREAD = 10
CHANNEL_PUBLIC_THREAD = 11
CHANNEL_PRIVATE_THREAD = 12
CHANNEL_GUILD_FORUM = 15
THREAD_TYPES = frozenset(
    {CHANNEL_ANNOUNCEMENT_THREAD, CHANNEL_PUBLIC_THREAD, CHANNEL_PRIVATE_THREAD}
)
TEXT_CHANNEL_TYPES = frozenset(
    {CHANNEL_GUILD_TEXT, CHANNEL_DM, CHANNEL_GUILD_VOICE, CHANNEL_GUILD_ANNOUNCEMENT} | THREAD_TYPES
)
THREAD_ARCHIVE_DURATIONS = frozenset({60, 1440, 4320, 10080})

# Message types and flags.
MESSAGE_DEFAULT = 0
MESSAGE_REPLY = 19
MESSAGE_CHAT_INPUT_COMMAND = 20
MESSAGE_CONTEXT_MENU_COMMAND = 23
MESSAGE_FLAG_SUPPRESS_EMBEDS = 1 << 2
MESSAGE_FLAG_EPHEMERAL = 1 << 6
MESSAGE_FLAG_LOADING = 1 << 7
MAX_MESSAGE_CONTENT_LENGTH = 2000
MAX_EMBEDS = 10
MAX_ALLOWED_MENTION_IDS = 100

# Interactions ("Receiving and Responding") and application commands.
INTERACTION_APPLICATION_COMMAND = 2
COMMAND_CHAT_INPUT = 1
COMMAND_USER = 2
COMMAND_MESSAGE = 3
COMMAND_PRIMARY_ENTRY_POINT = 4
MAX_COMMANDS = {
    COMMAND_CHAT_INPUT: 100,
    COMMAND_USER: 15,
    COMMAND_MESSAGE: 15,
    COMMAND_PRIMARY_ENTRY_POINT: 1,
}
MAX_COMMAND_OPTIONS = 25
OPTION_SUB_COMMAND = 1
OPTION_SUB_COMMAND_GROUP = 2
OPTION_STRING = 3
OPTION_INTEGER = 4
OPTION_BOOLEAN = 5
OPTION_USER = 6
OPTION_CHANNEL = 7
OPTION_ROLE = 8
OPTION_MENTIONABLE = 9
OPTION_NUMBER = 10
OPTION_ATTACHMENT = 11
CALLBACK_PONG = 1
CALLBACK_CHANNEL_MESSAGE_WITH_SOURCE = 4
CALLBACK_DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE = 5
CALLBACK_DEFERRED_UPDATE_MESSAGE = 6
CALLBACK_UPDATE_MESSAGE = 7
CALLBACK_AUTOCOMPLETE_RESULT = 8
CALLBACK_MODAL = 9
# Callback types that an APPLICATION_COMMAND interaction accepts; 6 and 7 are for components.
COMMAND_CALLBACK_TYPES = frozenset(
    {
        CALLBACK_CHANNEL_MESSAGE_WITH_SOURCE,
        CALLBACK_DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE,
        CALLBACK_MODAL,
    }
)
INTERACTION_CONTEXT_GUILD = 0
INTERACTION_CONTEXT_BOT_DM = 1
# The interaction object's attachment_size_limit, in bytes; discord.py 2.7 requires the field.
ATTACHMENT_SIZE_LIMIT = 10 * 1024 * 1024

# Chat-input command and option names ("Application Commands", "Application Command Naming").
_CHAT_INPUT_NAME = regex.compile(r"^[-_'\p{L}\p{N}\p{sc=Deva}\p{sc=Thai}]{1,32}$")
# Locales accepted in name_localizations and description_localizations ("Reference", "Locales").
LOCALES = frozenset(
    {
        "id", "da", "de", "en-GB", "en-US", "es-ES", "es-419", "fr", "hr", "it", "lt", "hu",
        "nl", "no", "pl", "pt-BR", "ro", "fi", "sv-SE", "vi", "tr", "cs", "el", "bg", "ru",
        "uk", "hi", "th", "zh-CN", "ja", "zh-TW", "ko",
    }
)  # fmt: skip

# Permission bits ("Permissions" topic).
PERMISSION_KICK_MEMBERS = 1 << 1
PERMISSION_ADMINISTRATOR = 1 << 3
PERMISSION_ADD_REACTIONS = 1 << 6
PERMISSION_VIEW_CHANNEL = 1 << 10
PERMISSION_SEND_MESSAGES = 1 << 11
PERMISSION_MANAGE_MESSAGES = 1 << 13
PERMISSION_EMBED_LINKS = 1 << 14
PERMISSION_ATTACH_FILES = 1 << 15
PERMISSION_READ_MESSAGE_HISTORY = 1 << 16
PERMISSION_MENTION_EVERYONE = 1 << 17
PERMISSION_USE_EXTERNAL_EMOJIS = 1 << 18
PERMISSION_USE_APPLICATION_COMMANDS = 1 << 31
PERMISSION_MANAGE_THREADS = 1 << 34
PERMISSION_CREATE_PUBLIC_THREADS = 1 << 35
PERMISSION_CREATE_PRIVATE_THREADS = 1 << 36
PERMISSION_SEND_MESSAGES_IN_THREADS = 1 << 38
PERMISSION_MODERATE_MEMBERS = 1 << 40
# Every permission bit that discord.py defines, for owners and administrators.
ALL_PERMISSIONS = discord.Permissions.all().value
DEFAULT_EVERYONE_PERMISSIONS = (
    PERMISSION_VIEW_CHANNEL
    | PERMISSION_SEND_MESSAGES
    | PERMISSION_READ_MESSAGE_HISTORY
    | PERMISSION_ADD_REACTIONS
    | PERMISSION_EMBED_LINKS
    | PERMISSION_ATTACH_FILES
    | PERMISSION_USE_EXTERNAL_EMOJIS
    | PERMISSION_USE_APPLICATION_COMMANDS
    | PERMISSION_CREATE_PUBLIC_THREADS
    | PERMISSION_SEND_MESSAGES_IN_THREADS
)

_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")
_EVERYONE_MENTION = re.compile(r"@(?:everyone|here)")


def snowflake_time(snowflake: int) -> dt.datetime:
    """Return the creation time encoded in a Discord snowflake."""
    milliseconds = (snowflake >> 22) + DISCORD_EPOCH_MS
    return dt.datetime.fromtimestamp(milliseconds / 1000, tz=dt.UTC)


def _iso(moment: dt.datetime) -> str:
    return moment.isoformat()


def _snowflake_iso(snowflake: int) -> str:
    return _iso(snowflake_time(snowflake))


class _SnowflakeFactory:
    """Issues increasing snowflakes whose timestamp part is the current time."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        now_ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        candidate = max(now_ms << 22, self._last + 1)
        self._last = candidate
        return candidate


# The people, guild and channels that a test talks about


@dataclass(frozen=True)
class DiscordUser:
    """A Discord user: the bot itself, or a person who writes to it."""

    id: int
    username: str
    global_name: str | None = None
    bot: bool = False

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"

    def to_dict(self) -> dict[str, Any]:
        user: dict[str, Any] = {
            "id": str(self.id),
            "username": self.username,
            # Users that picked a unique username have the discriminator "0".
            "discriminator": "0",
            "global_name": self.global_name,
            "avatar": None,
            "public_flags": 0,
        }
        if self.bot:
            user["bot"] = True
        return user


@dataclass(frozen=True)
class GuildRole:
    """A guild role; ``bot_id`` marks the managed role that Discord gives a bot."""

    id: int
    name: str
    permissions: int = 0
    position: int = 0
    color: int = 0
    hoist: bool = False
    mentionable: bool = False
    bot_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        role: dict[str, Any] = {
            "id": str(self.id),
            "name": self.name,
            "color": self.color,
            "colors": {
                "primary_color": self.color,
                "secondary_color": None,
                "tertiary_color": None,
            },
            "hoist": self.hoist,
            "icon": None,
            "unicode_emoji": None,
            "position": self.position,
            "permissions": str(self.permissions),
            "managed": self.bot_id is not None,
            "mentionable": self.mentionable,
            "flags": 0,
        }
        if self.bot_id is not None:
            role["tags"] = {"bot_id": str(self.bot_id)}
        return role


@dataclass(frozen=True)
class GuildMember:
    user: DiscordUser
    roles: tuple[int, ...] = ()
    nick: str | None = None
    joined_at: str = "2024-02-01T12:00:00+00:00"

    def to_dict(self, *, with_user: bool = True) -> dict[str, Any]:
        member: dict[str, Any] = {
            "nick": self.nick,
            "avatar": None,
            "banner": None,
            "roles": [str(role_id) for role_id in self.roles],
            "joined_at": self.joined_at,
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "communication_disabled_until": None,
        }
        if with_user:
            member["user"] = self.user.to_dict()
        return member


@dataclass
class GuildChannel:
    """A guild channel as the stand-in keeps it; a thread when ``type`` is 10, 11 or 12.

    ``owner_id`` and ``member_ids`` apply to threads: the user who started it and
    the users added to it.
    """

    id: int
    name: str
    type: int = CHANNEL_GUILD_TEXT
    parent_id: int | None = None
    position: int = 0
    topic: str | None = None
    nsfw: bool = False
    rate_limit_per_user: int = 0
    owner_id: int | None = None
    invitable: bool = True
    archived: bool = False
    auto_archive_duration: int = 1440
    member_ids: set[int] = field(default_factory=set)
    last_message_id: int | None = None
    message_count: int = 0

    @property
    def is_thread(self) -> bool:
        return self.type in THREAD_TYPES

    def to_dict(
        self, guild_id: int | None = None, *, member_id: int | None = None
    ) -> dict[str, Any]:
        """Return the channel object; ``member_id`` adds that user's thread member object."""
        channel: dict[str, Any] = {
            "id": str(self.id),
            "type": self.type,
            "name": self.name,
            "parent_id": None if self.parent_id is None else str(self.parent_id),
            "flags": 0,
            "last_message_id": None if self.last_message_id is None else str(self.last_message_id),
            "rate_limit_per_user": self.rate_limit_per_user,
        }
        if guild_id is not None:
            channel["guild_id"] = str(guild_id)
        if self.is_thread:
            channel.update(self._thread_fields(member_id))
        else:
            channel.update(
                {
                    "position": self.position,
                    "permission_overwrites": [],
                    "topic": self.topic,
                    "nsfw": self.nsfw,
                }
            )
        return channel

    def _thread_fields(self, member_id: int | None) -> dict[str, Any]:
        created = _snowflake_iso(self.id)
        metadata: dict[str, Any] = {
            "archived": self.archived,
            "auto_archive_duration": self.auto_archive_duration,
            "archive_timestamp": created,
            "locked": False,
            "create_timestamp": created,
        }
        if self.type == CHANNEL_PRIVATE_THREAD:
            metadata["invitable"] = self.invitable
        fields: dict[str, Any] = {
            "owner_id": str(self.owner_id),
            "message_count": self.message_count,
            "total_message_sent": self.message_count,
            # The documentation caps member_count at 50.
            "member_count": min(len(self.member_ids), 50),
            "thread_metadata": metadata,
        }
        if member_id is not None and member_id in self.member_ids:
            fields["member"] = _thread_member(self.id, member_id)
        return fields


def _thread_member(thread_id: int, user_id: int) -> dict[str, Any]:
    return {
        "id": str(thread_id),
        "user_id": str(user_id),
        "join_timestamp": _iso(dt.datetime.now(dt.UTC)),
        "flags": 0,
    }


@dataclass(frozen=True)
class DmChannel:
    """The direct-message channel between the bot and ``recipient``."""

    id: int
    recipient: DiscordUser

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "type": CHANNEL_DM,
            "last_message_id": None,
            "flags": 0,
            "recipients": [self.recipient.to_dict()],
        }


@dataclass
class StandinGuild:
    """A guild the bot is in. ``roles`` must contain @everyone, whose id is the guild's id."""

    id: int
    name: str
    owner_id: int
    roles: list[GuildRole]
    members: list[GuildMember]
    channels: list[GuildChannel]
    preferred_locale: str = "en-US"
    joined_at: str = "2024-02-01T12:00:00+00:00"

    def member(self, user_id: int) -> GuildMember | None:
        return next((member for member in self.members if member.user.id == user_id), None)

    def role(self, role_id: int) -> GuildRole | None:
        return next((role for role in self.roles if role.id == role_id), None)

    def channel(self, channel_id: int) -> GuildChannel | None:
        return next((channel for channel in self.channels if channel.id == channel_id), None)

    def permissions_of(self, user_id: int) -> int:
        """Return the guild-level permissions of a member: @everyone plus their roles.

        NOTE: channel permission overwrites are not modelled.
        """
        if user_id == self.owner_id:
            return ALL_PERMISSIONS
        member = self.member(user_id)
        everyone = self.role(self.id)
        permissions = everyone.permissions if everyone is not None else 0
        for role_id in member.roles if member is not None else ():
            role = self.role(role_id)
            if role is not None:
                permissions |= role.permissions
        if permissions & PERMISSION_ADMINISTRATOR:
            return ALL_PERMISSIONS
        return permissions


DEFAULT_BOT = DiscordUser(id=1_200_000_000_000_000_001, username="MindHarbor", bot=True)
# A token shaped like Discord's: the bot's id in base64, then two more dot-separated parts.
DEFAULT_TOKEN = (
    base64.urlsafe_b64encode(str(DEFAULT_BOT.id).encode()).decode().rstrip("=")
    + ".GStand.in-token-for-mindharbor-tests-only"
)
DEFAULT_GUILD_ID = 1_200_000_000_000_000_100
MODERATOR_ROLE_ID = 1_200_000_000_000_000_101
BOT_ROLE_ID = 1_200_000_000_000_000_102
CATEGORY_CHANNEL_ID = 1_200_000_000_000_000_199
GENERAL_CHANNEL_ID = 1_200_000_000_000_000_200
SUPPORT_CHANNEL_ID = 1_200_000_000_000_000_201
CHECK_IN_THREAD_ID = 1_200_000_000_000_000_300
GUILD_OWNER = DiscordUser(
    id=1_200_000_000_000_000_400, username="harbor_owner", global_name="Owner"
)
DEFAULT_USER = DiscordUser(id=1_200_000_000_000_000_401, username="alice", global_name="Alice")
DEFAULT_MODERATOR = DiscordUser(
    id=1_200_000_000_000_000_402, username="mod_mira", global_name="Mira"
)


def default_guild(bot: DiscordUser = DEFAULT_BOT) -> StandinGuild:
    """Build the guild that tests get unless they pass their own.

    Members are its owner, ``DEFAULT_USER``, ``DEFAULT_MODERATOR`` (with the
    Moderators role) and the bot (with its managed role). Channels are a
    category, the text channels #general and #support, and a public thread
    #check-in under #general.
    """
    bot_permissions = (
        DEFAULT_EVERYONE_PERMISSIONS
        | PERMISSION_MANAGE_MESSAGES
        | PERMISSION_MANAGE_THREADS
        | PERMISSION_CREATE_PRIVATE_THREADS
    )
    moderator_permissions = (
        DEFAULT_EVERYONE_PERMISSIONS
        | PERMISSION_MANAGE_MESSAGES
        | PERMISSION_MANAGE_THREADS
        | PERMISSION_MODERATE_MEMBERS
        | PERMISSION_KICK_MEMBERS
    )
    return StandinGuild(
        id=DEFAULT_GUILD_ID,
        name="MindHarbor Test Guild",
        owner_id=GUILD_OWNER.id,
        roles=[
            GuildRole(
                id=DEFAULT_GUILD_ID, name="@everyone", permissions=DEFAULT_EVERYONE_PERMISSIONS
            ),
            GuildRole(
                id=MODERATOR_ROLE_ID,
                name="Moderators",
                permissions=moderator_permissions,
                position=2,
                hoist=True,
                mentionable=True,
            ),
            GuildRole(
                id=BOT_ROLE_ID,
                name=bot.username,
                permissions=bot_permissions,
                position=1,
                bot_id=bot.id,
            ),
        ],
        members=[
            GuildMember(GUILD_OWNER),
            GuildMember(DEFAULT_USER),
            GuildMember(DEFAULT_MODERATOR, roles=(MODERATOR_ROLE_ID,)),
            GuildMember(bot, roles=(BOT_ROLE_ID,)),
        ],
        channels=[
            GuildChannel(id=CATEGORY_CHANNEL_ID, name="Support", type=CHANNEL_GUILD_CATEGORY),
            GuildChannel(
                id=GENERAL_CHANNEL_ID,
                name="general",
                parent_id=CATEGORY_CHANNEL_ID,
                topic="Talk with MindHarbor",
            ),
            GuildChannel(
                id=SUPPORT_CHANNEL_ID, name="support", parent_id=CATEGORY_CHANNEL_ID, position=1
            ),
            GuildChannel(
                id=CHECK_IN_THREAD_ID,
                name="check-in",
                type=CHANNEL_PUBLIC_THREAD,
                parent_id=GENERAL_CHANNEL_ID,
                owner_id=GUILD_OWNER.id,
                member_ids={GUILD_OWNER.id},
            ),
        ],
    )


# Records of what the bot did


@dataclass
class ApiCall:
    """One REST request: its route template, path, query, JSON body and response status."""

    method: str
    path: str
    # "METHOD /template", e.g. "POST /channels/{channel_id}/messages"; None for unknown routes.
    route: str | None
    query: dict[str, str]
    body: Any = None
    status: int | None = None
    # The JSON error code of an error response.
    error_code: int | None = None
    # time.monotonic() when the request arrived.
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Pings:
    """Who a message notifies, after its allowed_mentions and the bot's permissions."""

    everyone: bool
    users: frozenset[int]
    roles: frozenset[int]

    @property
    def any(self) -> bool:
        return self.everyone or bool(self.users) or bool(self.roles)


@dataclass
class SentMessage:
    """A message created by the bot: through REST, or as an interaction response or followup.

    ``content`` and the other fields follow edits; ``edits`` keeps each edit's
    request body, oldest first.
    """

    id: int
    channel_id: int
    guild_id: int | None
    author: DiscordUser
    content: str
    embeds: list[dict[str, Any]]
    components: list[dict[str, Any]]
    attachments: list[dict[str, Any]]
    # The request's allowed_mentions, None when the request had none.
    allowed_mentions: dict[str, Any] | None
    message_reference: dict[str, Any] | None
    flags: int
    tts: bool
    pings: Pings
    # "channel" (POST /channels/{id}/messages), "interaction_response" or "followup".
    source: str
    interaction_id: int | None = None
    # Uploaded files by filename.
    files: dict[str, bytes] = field(default_factory=dict)
    edits: list[dict[str, Any]] = field(default_factory=list)
    deleted: bool = False

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & MESSAGE_FLAG_EPHEMERAL)

    @property
    def loading(self) -> bool:
        """True while a deferred interaction response still shows "thinking"."""
        return bool(self.flags & MESSAGE_FLAG_LOADING)


@dataclass
class InteractionRecord:
    """An INTERACTION_CREATE that the stand-in dispatched, with the state of its response."""

    id: int
    token: str
    name: str
    command_type: int
    channel_id: int
    guild_id: int | None
    user: DiscordUser
    payload: dict[str, Any]
    # Event-loop time when the INTERACTION_CREATE went out.
    sent_at: float
    # The callback type of the accepted initial response, None until then.
    response_type: int | None = None
    original_message_id: int | None = None
    followup_message_ids: list[int] = field(default_factory=list)

    @property
    def acknowledged(self) -> bool:
        return self.response_type is not None


@dataclass(frozen=True)
class InteractionResponse:
    """One request to an interaction's callback or webhook routes, accepted or rejected.

    ``kind`` is "callback", "followup", "get_original", "edit_original",
    "delete_original" or "edit_followup".
    """

    interaction_id: int
    kind: str
    callback_type: int | None
    data: dict[str, Any] | None
    status: int
    error_code: int | None
    message_id: int | None


@dataclass
class GatewayConnection:
    """One websocket connection to the gateway."""

    path: str
    query: dict[str, str]
    # "zlib-stream", or None for plain JSON text frames.
    compress: str | None
    session_id: str | None = None
    resumed: bool = False
    close_code: int | None = None
    # Who closed first: "server" or "client"; None while open.
    closed_by: str | None = None


@dataclass(frozen=True)
class DispatchedEvent:
    """A DISPATCH payload as one session received it (message content already emptied)."""

    session_id: str
    sequence: int
    event: str
    data: dict[str, Any]


# REST errors and scripted faults


class ApiError(Exception):
    """A Discord REST error: HTTP status plus the JSON ``{"message", "code", "errors"?}``."""

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        *,
        errors: dict[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {message} (code {code})")
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors
        self.headers = dict(headers or {})
        # A body that replaces the usual one, as a 429's does.
        self.body_override = body

    def body(self) -> dict[str, Any]:
        if self.body_override is not None:
            return self.body_override
        body: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors is not None:
            body["errors"] = self.errors
        return body


def invalid_form_body(field_path: str, error_code: str, message: str) -> ApiError:
    """Return the 400 "Invalid Form Body" (50035) error for one field, e.g. "data.content"."""
    errors: dict[str, Any] = {"_errors": [{"code": error_code, "message": message}]}
    for part in reversed(field_path.split(".")):
        errors = {part: errors}
    return ApiError(400, 50035, "Invalid Form Body", errors=errors)


def _content_too_long(field_path: str) -> ApiError:
    return invalid_form_body(
        field_path,
        "BASE_TYPE_MAX_LENGTH",
        f"Must be {MAX_MESSAGE_CONTENT_LENGTH} or fewer in length.",
    )


def _not_found_route() -> ApiError:
    return ApiError(404, 0, "404: Not Found")


def _method_not_allowed() -> ApiError:
    return ApiError(405, 0, "405: Method Not Allowed")


def _unauthorized() -> ApiError:
    return ApiError(401, 0, "401: Unauthorized")


def _unknown_channel() -> ApiError:
    return ApiError(404, 10003, "Unknown Channel")


def _unknown_message() -> ApiError:
    return ApiError(404, 10008, "Unknown Message")


def _unknown_member() -> ApiError:
    return ApiError(404, 10007, "Unknown Member")


def _unknown_user() -> ApiError:
    return ApiError(404, 10013, "Unknown User")


def _unknown_guild() -> ApiError:
    return ApiError(404, 10004, "Unknown Guild")


def _unknown_interaction() -> ApiError:
    return ApiError(404, 10062, "Unknown interaction")


def _unknown_webhook() -> ApiError:
    return ApiError(404, 10015, "Unknown Webhook")


def _already_acknowledged() -> ApiError:
    return ApiError(400, 40060, "Interaction has already been acknowledged.")


def _empty_message() -> ApiError:
    return ApiError(400, 50006, "Cannot send an empty message")


def _invalid_json() -> ApiError:
    return ApiError(400, 50109, "The request body contains invalid JSON.")


@dataclass(frozen=True)
class RateLimit:
    """A scripted 429 for one request. ``scope`` is "user", "shared" or "global"."""

    retry_after: float = 0.5
    scope: str = "user"

    def to_error(self, bucket: str) -> ApiError:
        is_global = self.scope == "global"
        headers = {
            "Retry-After": str(math.ceil(self.retry_after)),
            "X-RateLimit-Scope": self.scope,
        }
        if is_global:
            headers["X-RateLimit-Global"] = "true"
        else:
            headers.update(
                {
                    "X-RateLimit-Limit": "5",
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": f"{time.time() + self.retry_after:.3f}",
                    "X-RateLimit-Reset-After": f"{self.retry_after:.3f}",
                    "X-RateLimit-Bucket": bucket,
                }
            )
        # A 429 body has retry_after and global in place of a JSON error code.
        body = {
            "message": "You are being rate limited.",
            "retry_after": self.retry_after,
            "global": is_global,
        }
        return ApiError(429, 0, "You are being rate limited.", headers=headers, body=body)


Fault = ApiError | RateLimit


# REST plumbing


@dataclass
class _Call:
    """A parsed REST request, as the route handlers get it."""

    params: dict[str, str]
    query: Mapping[str, str]
    body: Any
    files: list[tuple[str, str, bytes, str | None]]

    def param_id(self, name: str) -> int:
        value = self.params[name]
        if not value.isdigit():
            raise _not_found_route()
        return int(value)

    def json_object(self) -> dict[str, Any]:
        if self.body is None:
            return {}
        if not isinstance(self.body, dict):
            raise invalid_form_body(
                "_root", "DICT_TYPE_CONVERT", "Only dictionaries may be used in a DictType"
            )
        return self.body


@dataclass(frozen=True)
class _Reply:
    status: int
    body: Any = None


_Handler = Callable[[_Call], Any]


@dataclass(frozen=True)
class _Route:
    method: str
    template: str
    pattern: re.Pattern[str]
    handler: _Handler
    # False for routes that Discord serves without a bot token: GET /gateway and the
    # interaction and webhook routes, whose token is in the path.
    needs_bot_token: bool = True

    @property
    def key(self) -> str:
        return f"{self.method} {self.template}"


def _route_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[a-z_]+\})", template)
    expression = "".join(
        f"(?P<{part[1:-1]}>[^/]+)" if part.startswith("{") else re.escape(part) for part in parts
    )
    return re.compile(f"^{expression}$")


def _bucket_hash(route_key: str) -> str:
    return hashlib.sha1(route_key.encode()).hexdigest()[:16]


# Gateway plumbing


class _Connection:
    """One gateway websocket: it compresses and sends payloads in order."""

    def __init__(self, ws: web.WebSocketResponse, record: GatewayConnection) -> None:
        self.ws = ws
        self.record = record
        self.session: _Session | None = None
        self._compressor = zlib.compressobj() if record.compress == "zlib-stream" else None
        self._send_lock = asyncio.Lock()
        self._event_times: deque[float] = deque()

    @property
    def open(self) -> bool:
        return not self.ws.closed

    async def send(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        # The lock keeps frames in compression order: the zlib stream is shared.
        async with self._send_lock:
            if self.ws.closed:
                return
            if self._compressor is None:
                await self.ws.send_str(data.decode())
            else:
                frame = self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
                await self.ws.send_bytes(frame)

    async def close(self, code: int, reason: str | None = None) -> None:
        if self.record.closed_by is None:
            self.record.closed_by = "server"
            self.record.close_code = code
        message = (reason or CLOSE_REASONS.get(code, "")).encode()
        await self.ws.close(code=code, message=message)

    def count_event(self, now: float) -> bool:
        """Count a sent gateway event; return False once the per-minute limit is passed."""
        self._event_times.append(now)
        while self._event_times and self._event_times[0] < now - 60:
            self._event_times.popleft()
        return len(self._event_times) <= MAX_GATEWAY_EVENTS_PER_MINUTE


@dataclass
class _Session:
    """A gateway session: it outlives its connection until it ends or is resumed."""

    session_id: str
    intents: int
    shard_id: int
    shard_count: int
    large_threshold: int
    sequence: int = 0
    # Every dispatch of the session, kept for replay on RESUME.
    log: list[dict[str, Any]] = field(default_factory=list)
    connection: _Connection | None = None

    def receives(self, *, guild_id: int | None, intent: int) -> bool:
        if intent and not self.intents & intent:
            return False
        # Events without a guild go to shard 0 ("Sharding").
        target_shard = (guild_id >> 22) % self.shard_count if guild_id is not None else 0
        return target_shard == self.shard_id


class DiscordStandin:
    """The stand-in Discord server; ``async with`` starts it on an ephemeral port and stops it.

    ``token`` is the only bot token accepted, on REST and in IDENTIFY, and
    ``application_id`` defaults to the bot's user id. ``intents_allowed`` contains
    the privileged intents enabled for the application, out of MESSAGE_CONTENT
    (the default), GUILD_MEMBERS and GUILD_PRESENCES. An IDENTIFY that requests
    any other privileged intent is closed with 4014.
    ``verified`` picks the application flags that report them: the plain ones
    for a verified app, the ``_LIMITED`` ones otherwise. ``heartbeat_interval_ms``
    goes out in HELLO. An interaction's initial response must arrive within
    ``interaction_response_deadline`` seconds of its INTERACTION_CREATE, and its
    token serves followups for ``interaction_token_lifetime`` seconds.
    """

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        bot: DiscordUser = DEFAULT_BOT,
        application_id: int | None = None,
        intents_allowed: int = INTENT_MESSAGE_CONTENT,
        verified: bool = False,
        guilds: Sequence[StandinGuild] | None = None,
        heartbeat_interval_ms: int = 45_000,
        interaction_response_deadline: float = 3.0,
        interaction_token_lifetime: float = 15 * 60,
        recommended_shards: int = 1,
    ) -> None:
        if not bot.bot:
            raise ValueError(f"The bot user {bot.username!r} must have bot=True.")
        if intents_allowed & ~DEFINED_INTENTS:
            raise ValueError(f"intents_allowed {intents_allowed} has bits that no intent defines.")
        self.token = token
        self.bot = bot
        self.application_id = application_id if application_id is not None else bot.id
        # Standard intents need no approval, so only the privileged bits matter.
        self.intents_allowed = intents_allowed & PRIVILEGED_INTENTS
        self.verified = verified
        self.guilds: dict[int, StandinGuild] = {
            guild.id: guild for guild in (guilds if guilds is not None else [default_guild(bot)])
        }
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.interaction_response_deadline = interaction_response_deadline
        self.interaction_token_lifetime = interaction_token_lifetime
        self.recommended_shards = recommended_shards

        # What the bot did, in order.
        self.calls: list[ApiCall] = []
        self.messages: list[SentMessage] = []
        self.interaction_responses: list[InteractionResponse] = []
        self.typing: list[int] = []
        # Registered application commands: key None for global ones, else the guild id.
        self.commands: dict[int | None, list[dict[str, Any]]] = {}
        self.threads: list[GuildChannel] = []
        # DM channels by the recipient's user id.
        self.dm_channels: dict[int, DmChannel] = {}
        # The latest IDENTIFY's "d", and all of them in order.
        self.identify: dict[str, Any] | None = None
        self.identifies: list[dict[str, Any]] = []
        self.resumes: list[dict[str, Any]] = []
        self.presence_updates: list[dict[str, Any]] = []
        self.member_requests: list[dict[str, Any]] = []
        # The sequence number ("d") of each heartbeat received, and the ACKs sent.
        self.heartbeats: list[int | None] = []
        self.heartbeat_acks = 0
        self.gateway_connections: list[GatewayConnection] = []
        self.events: list[DispatchedEvent] = []
        # Messages sent by users through send_message_create, as created (content intact).
        self.incoming: list[dict[str, Any]] = []
        self.interactions: dict[int, InteractionRecord] = {}
        # Set while at least one session is connected and has had READY or RESUMED.
        self.connected = asyncio.Event()

        self._ids = _SnowflakeFactory()
        self._users: dict[int, DiscordUser] = {bot.id: bot}
        for guild in self.guilds.values():
            for member in guild.members:
                self._users[member.user.id] = member.user
        self._dm_by_channel: dict[int, DmChannel] = {}
        # Every message by id, in the REST shape (no guild_id or member).
        self._messages: dict[int, dict[str, Any]] = {}
        self._sent_by_id: dict[int, SentMessage] = {}
        self._attachments: dict[tuple[int, int], bytes] = {}
        self._thread_starters: set[int] = set()
        self._sessions: dict[str, _Session] = {}
        self._connections: list[_Connection] = []
        self._faults: dict[str, deque[Fault]] = {}
        self._session_starts = 0
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._routes = self._build_routes()

    # Lifecycle

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("The stand-in is not started; use it in an `async with` block.")
        return f"http://127.0.0.1:{self._port}"

    @property
    def api_base(self) -> str:
        """The value for ``discord.http.Route.BASE``."""
        return f"{self.url}/api/v{API_VERSION}"

    @property
    def gateway_url(self) -> str:
        """The websocket URL that GET /gateway and /gateway/bot return."""
        return f"ws://127.0.0.1:{self._port}/gateway"

    @property
    def resume_gateway_url(self) -> str:
        """The READY event's resume_gateway_url; connections to it are recorded apart."""
        return f"ws://127.0.0.1:{self._port}/resume-gateway"

    async def start(self) -> None:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_get("/gateway", self._handle_gateway)
        app.router.add_get("/gateway/", self._handle_gateway)
        app.router.add_get("/resume-gateway", self._handle_gateway)
        app.router.add_get("/resume-gateway/", self._handle_gateway)
        app.router.add_get(
            "/attachments/{channel_id}/{attachment_id}/{filename}", self._handle_attachment
        )
        app.router.add_route("*", "/{tail:.*}", self._handle_rest)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        # Port 0 lets the kernel pick a free ephemeral port.
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]
        logger.info("Discord stand-in listening on %s", self.url)

    async def close(self) -> None:
        for connection in list(self._connections):
            if connection.open:
                await connection.close(1001, "Stand-in shutting down")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        logger.info("Discord stand-in stopped")

    async def __aenter__(self) -> DiscordStandin:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # Scripted REST faults

    @property
    def route_keys(self) -> list[str]:
        """Every route the stand-in serves, as "METHOD /template"."""
        return [route.key for route in self._routes]

    def fail_next(self, route: str, *errors: ApiError) -> None:
        """Make the next requests to ``route`` ("POST /channels/{channel_id}/messages") fail.

        Each error is the response to one request, in order, after the token check.
        """
        self._check_route_key(route)
        self._faults.setdefault(route, deque()).extend(errors)

    def rate_limit_next(
        self, route: str, *, retry_after: float = 0.5, scope: str = "user", times: int = 1
    ) -> None:
        """Respond to the next ``times`` requests to ``route`` with a 429 of ``retry_after`` s."""
        if scope not in ("user", "shared", "global"):
            raise ValueError(
                f"Invalid rate-limit scope {scope!r}: use 'user', 'shared' or 'global'."
            )
        self._check_route_key(route)
        self._faults.setdefault(route, deque()).extend(
            RateLimit(retry_after=retry_after, scope=scope) for _ in range(times)
        )

    def _check_route_key(self, route: str) -> None:
        if route not in self.route_keys:
            known = "\n  ".join(self.route_keys)
            raise ValueError(f"Unknown route {route!r}. Routes served:\n  {known}")

    def calls_to(self, route: str) -> list[ApiCall]:
        return [call for call in self.calls if call.route == route]

    # Users, channels and messages

    @property
    def application_flags(self) -> int:
        flags = APP_FLAG_APPLICATION_COMMAND_BADGE if self.commands.get(None) else 0
        pairs = (
            (
                INTENT_MESSAGE_CONTENT,
                APP_FLAG_GATEWAY_MESSAGE_CONTENT,
                APP_FLAG_GATEWAY_MESSAGE_CONTENT_LIMITED,
            ),
            (
                INTENT_GUILD_MEMBERS,
                APP_FLAG_GATEWAY_GUILD_MEMBERS,
                APP_FLAG_GATEWAY_GUILD_MEMBERS_LIMITED,
            ),
            (INTENT_GUILD_PRESENCES, APP_FLAG_GATEWAY_PRESENCE, APP_FLAG_GATEWAY_PRESENCE_LIMITED),
        )
        for intent, verified_flag, limited_flag in pairs:
            if self.intents_allowed & intent:
                flags |= verified_flag if self.verified else limited_flag
        return flags

    def add_user(self, user: DiscordUser) -> None:
        """Make a user known, so that REST calls naming them (create DM, fetch user) succeed."""
        self._users[user.id] = user

    def create_dm_channel(self, user: DiscordUser) -> DmChannel:
        """Return the DM channel between the bot and ``user``, creating it on first use.

        No CHANNEL_CREATE goes out, because the documentation sends that event for
        guild channels only. discord.py learns the channel from the first message or
        interaction in it.
        """
        self.add_user(user)
        existing = self.dm_channels.get(user.id)
        if existing is not None:
            return existing
        channel = DmChannel(id=self._ids.next(), recipient=user)
        self.dm_channels[user.id] = channel
        self._dm_by_channel[channel.id] = channel
        self._notify()
        return channel

    def guild_of_channel(self, channel_id: int) -> StandinGuild | None:
        return next((g for g in self.guilds.values() if g.channel(channel_id) is not None), None)

    def channel(self, channel_id: int) -> GuildChannel | DmChannel | None:
        dm = self._dm_by_channel.get(channel_id)
        if dm is not None:
            return dm
        guild = self.guild_of_channel(channel_id)
        return guild.channel(channel_id) if guild is not None else None

    def message(self, message_id: int) -> dict[str, Any] | None:
        """Return a stored message in the REST shape, content intact, or None."""
        stored = self._messages.get(message_id)
        return copy.deepcopy(stored) if stored is not None else None

    def messages_in(self, channel_id: int) -> list[SentMessage]:
        return [message for message in self.messages if message.channel_id == channel_id]

    def command(
        self, name: str, *, guild_id: int | None = None, command_type: int = COMMAND_CHAT_INPUT
    ) -> dict[str, Any] | None:
        """Return the registered command with this name and type, global or in ``guild_id``."""
        return next(
            (
                command
                for command in self.commands.get(guild_id, [])
                if command["name"] == name and command["type"] == command_type
            ),
            None,
        )

    # Gateway dispatch helpers

    async def send_event(
        self,
        event: str,
        data: dict[str, Any],
        *,
        guild_id: int | None = None,
        intent: int = 0,
    ) -> int:
        """Dispatch ``event`` to every session that has ``intent`` and the shard of ``guild_id``.

        Sessions that are disconnected but resumable store the event for replay.
        Return how many sessions got it. Raise RuntimeError when no session exists,
        which means no client has identified yet.
        """
        return await self._dispatch(event, data, guild_id=guild_id, intent=intent)

    async def send_message_create(
        self,
        channel_id: int,
        author: DiscordUser,
        content: str = "",
        *,
        guild_id: int | None = None,
        mentions: Sequence[DiscordUser] = (),
        attachments: Sequence[Mapping[str, Any]] = (),
        embeds: Sequence[Mapping[str, Any]] = (),
        components: Sequence[Mapping[str, Any]] = (),
        sticker_items: Sequence[Mapping[str, Any]] = (),
        message_reference: int | Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Dispatch a MESSAGE_CREATE for a message that ``author`` wrote in ``channel_id``.

        Users and roles mentioned in ``content`` (``<@id>``, ``<@&id>``) join the
        message's mentions, as do ``mentions``. ``message_reference`` is the id of
        the message replied to, or a full message reference object. Each session
        gets the message without content, embeds, attachments, components and poll
        unless it has MESSAGE_CONTENT, the channel is a DM, or the bot is mentioned.
        An author who is not a member of the guild becomes one. Return the message
        as created, content intact.
        """
        channel = self.channel(channel_id)
        if channel is None:
            raise ValueError(
                f"Unknown channel {channel_id}: use a guild channel or create_dm_channel()."
            )
        guild = self.guild_of_channel(channel_id)
        if guild_id is not None and (guild is None or guild.id != guild_id):
            raise ValueError(f"Channel {channel_id} is not in guild {guild_id}.")
        self.add_user(author)
        if guild is not None and guild.member(author.id) is None:
            guild.members.append(GuildMember(author))

        reference, referenced = self._user_message_reference(channel_id, guild, message_reference)
        mentioned = list(mentions)
        if referenced is not None and referenced["author"]["id"] != str(author.id):
            # A reply pings the replied-to author by default, and lists them in mentions.
            replied_author = self._users.get(int(referenced["author"]["id"]))
            if replied_author is not None:
                mentioned.append(replied_author)
        message = self._new_message(
            channel_id=channel_id,
            guild=guild,
            author=author,
            content=content,
            embeds=[dict(embed) for embed in embeds],
            components=[dict(component) for component in components],
            attachments=[
                self._user_attachment(channel_id, attachment) for attachment in attachments
            ],
            flags=0,
            tts=False,
            message_type=MESSAGE_REPLY if reference is not None else MESSAGE_DEFAULT,
            message_reference=reference,
            referenced_message=referenced,
            extra_mentions=mentioned,
            sticker_items=[dict(sticker) for sticker in sticker_items],
        )
        self.incoming.append(copy.deepcopy(message))
        await self._dispatch_message("MESSAGE_CREATE", message, guild)
        return copy.deepcopy(message)

    async def send_interaction_create(
        self,
        channel_id: int,
        user: DiscordUser,
        name: str,
        *,
        options: Mapping[str, Any] | Sequence[Mapping[str, Any]] = (),
        command_type: int = COMMAND_CHAT_INPUT,
        target_id: int | None = None,
        locale: str = "en-US",
        command_id: int | None = None,
    ) -> InteractionRecord:
        """Dispatch an APPLICATION_COMMAND interaction: ``user`` ran ``name`` in ``channel_id``.

        The command must be registered (global, or in the channel's guild) unless
        ``command_id`` is given, because Discord only sends interactions for
        registered commands. ``options`` is a list of option objects, or a mapping
        of option names to values whose types come from the registered command
        (else from the Python value: str, int, bool, float, DiscordUser,
        GuildChannel, GuildRole). For a user or message command (``command_type`` 2
        or 3), ``target_id`` names the user or the stored message. In a guild the
        payload has ``member``; in a DM it has ``user``.
        """
        channel = self.channel(channel_id)
        if channel is None:
            raise ValueError(
                f"Unknown channel {channel_id}: use a guild channel or create_dm_channel()."
            )
        guild = self.guild_of_channel(channel_id)
        self.add_user(user)
        if guild is not None and guild.member(user.id) is None:
            guild.members.append(GuildMember(user))

        registered = self._registered_command(name, command_type, guild)
        if registered is None and command_id is None:
            scope = f"globally or in guild {guild.id}" if guild is not None else "globally"
            raise LookupError(
                f"Command {name!r} (type {command_type}) is not registered {scope}; "
                "sync the CommandTree first or pass command_id=."
            )
        data: dict[str, Any] = {
            "id": str(command_id if command_id is not None else registered["id"]),  # type: ignore[index]
            "name": name,
            "type": command_type,
        }
        if registered is not None and registered.get("guild_id") is not None:
            data["guild_id"] = registered["guild_id"]
        resolved: dict[str, dict[str, Any]] = {}
        if command_type == COMMAND_CHAT_INPUT:
            built = self._interaction_options(options, registered, guild, resolved)
            if built:
                data["options"] = built
        else:
            if target_id is None:
                raise ValueError(f"A command of type {command_type} needs target_id.")
            self._resolve_target(command_type, target_id, guild, resolved)
            data["target_id"] = str(target_id)
        if resolved:
            data["resolved"] = resolved

        interaction_id = self._ids.next()
        token = "aW50ZXJhY3Rpb246" + secrets.token_urlsafe(48)
        payload = self._interaction_payload(
            interaction_id, token, data, channel, guild, user, locale
        )
        record = InteractionRecord(
            id=interaction_id,
            token=token,
            name=name,
            command_type=command_type,
            channel_id=channel_id,
            guild_id=guild.id if guild is not None else None,
            user=user,
            payload=copy.deepcopy(payload),
            sent_at=asyncio.get_running_loop().time(),
        )
        # The response deadline counts from the moment the event goes out.
        self.interactions[interaction_id] = record
        await self._dispatch("INTERACTION_CREATE", payload, guild_id=record.guild_id, intent=0)
        return record

    async def send_reconnect(self) -> None:
        """Send RECONNECT (op 7) on every open connection; clients should resume."""
        for connection in self._live_connections():
            await connection.send({"op": OP_RECONNECT, "d": None, "s": None, "t": None})

    async def send_invalid_session(self, *, resumable: bool = False) -> None:
        """Send INVALID_SESSION (op 9) on every open connection; unless resumable, end sessions."""
        for connection in self._live_connections():
            session = connection.session
            if session is not None and not resumable:
                self._end_session(session)
            await connection.send({"op": OP_INVALID_SESSION, "d": resumable, "s": None, "t": None})

    async def request_heartbeat(self) -> None:
        """Send HEARTBEAT (op 1) on every open connection; clients must send one back at once."""
        for connection in self._live_connections():
            await connection.send({"op": OP_HEARTBEAT, "d": None, "s": None, "t": None})

    async def close_gateway(
        self, code: int = CLOSE_UNKNOWN_ERROR, reason: str | None = None
    ) -> None:
        """Close every gateway connection with ``code``; sessions stay resumable.

        The sessions are detached before the close handshake, so events sent
        from now on wait in their logs for a RESUME.
        """
        for connection in list(self._connections):
            if connection.session is not None:
                self._detach(connection)
            if connection.open:
                await connection.close(code, reason)

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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            changed = self._changed
            value = condition()
            if value:
                return value
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"Timed out after {timeout} s waiting for {description}.")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    async def wait_until_connected(self, *, timeout: float = 5.0) -> None:
        """Wait until a client has identified (or resumed) and got READY and its guilds."""
        await self.wait_for(
            self.connected.is_set, timeout=timeout, description="a connected gateway session"
        )

    async def wait_for_messages(
        self, channel_id: int, count: int = 1, *, timeout: float = 5.0
    ) -> list[SentMessage]:
        """Wait until the bot has created ``count`` messages in ``channel_id``; return all there."""

        def enough() -> list[SentMessage]:
            found = self.messages_in(channel_id)
            return found if len(found) >= count else []

        try:
            return await self.wait_for(
                enough, timeout=timeout, description=f"{count} message(s) in channel {channel_id}"
            )
        except TimeoutError as error:
            seen = [message.content for message in self.messages_in(channel_id)]
            raise TimeoutError(f"{error} Messages there: {seen!r}") from None

    async def wait_for_interaction_responses(
        self, interaction_id: int | None = None, count: int = 1, *, timeout: float = 5.0
    ) -> list[InteractionResponse]:
        """Wait for ``count`` requests to interaction routes (of one interaction, if given)."""

        def enough() -> list[InteractionResponse]:
            found = [
                response
                for response in self.interaction_responses
                if interaction_id is None or response.interaction_id == interaction_id
            ]
            return found if len(found) >= count else []

        return await self.wait_for(
            enough, timeout=timeout, description=f"{count} interaction response request(s)"
        )

    async def wait_for_typing(self, channel_id: int, *, timeout: float = 5.0) -> None:
        await self.wait_for(
            lambda: channel_id in self.typing,
            timeout=timeout,
            description=f"a typing indicator in channel {channel_id}",
        )

    async def wait_for_calls(
        self, route: str, count: int = 1, *, timeout: float = 5.0
    ) -> list[ApiCall]:
        self._check_route_key(route)

        def enough() -> list[ApiCall]:
            found = self.calls_to(route)
            return found if len(found) >= count else []

        return await self.wait_for(
            enough, timeout=timeout, description=f"{count} call(s) to {route}"
        )

    def _notify(self) -> None:
        """Wake every waiter: the event of this state is set and a new one replaces it."""
        self._changed.set()
        self._changed = asyncio.Event()

    # Messages: building, content rules, dispatch

    def _new_message(
        self,
        *,
        channel_id: int,
        guild: StandinGuild | None,
        author: DiscordUser,
        content: str,
        embeds: list[dict[str, Any]],
        components: list[dict[str, Any]],
        attachments: list[dict[str, Any]],
        flags: int,
        tts: bool,
        message_type: int,
        message_reference: dict[str, Any] | None,
        referenced_message: dict[str, Any] | None,
        extra_mentions: Sequence[DiscordUser] = (),
        message_id: int | None = None,
        sticker_items: list[dict[str, Any]] | None = None,
        interaction: dict[str, Any] | None = None,
        nonce: str | int | None = None,
    ) -> dict[str, Any]:
        """Build and store a message in the REST shape: no guild_id, no member."""
        message_id = message_id if message_id is not None else self._ids.next()

        mentioned_ids = [int(match) for match in _USER_MENTION.findall(content)]
        mentioned_ids += [user.id for user in extra_mentions]
        mentions = []
        for user_id in dict.fromkeys(mentioned_ids):
            user = self._users.get(user_id)
            if user is not None:
                mentions.append(user.to_dict())
        role_ids = [int(match) for match in _ROLE_MENTION.findall(content)]
        mention_roles = [
            str(role_id)
            for role_id in dict.fromkeys(role_ids)
            if guild is not None and guild.role(role_id)
        ]

        message: dict[str, Any] = {
            "id": str(message_id),
            "channel_id": str(channel_id),
            "author": author.to_dict(),
            "content": content,
            "timestamp": _snowflake_iso(message_id),
            "edited_timestamp": None,
            "tts": tts,
            # Only authors with MENTION_EVERYONE mention everyone with @everyone or @here.
            "mention_everyone": guild is not None
            and bool(guild.permissions_of(author.id) & PERMISSION_MENTION_EVERYONE)
            and bool(_EVERYONE_MENTION.search(content)),
            "mentions": mentions,
            "mention_roles": mention_roles,
            "attachments": attachments,
            "embeds": embeds,
            "pinned": False,
            "type": message_type,
            "flags": flags,
            "components": components,
        }
        if sticker_items:
            message["sticker_items"] = sticker_items
        if nonce is not None:
            message["nonce"] = nonce
        if message_reference is not None:
            message["message_reference"] = message_reference
            message["referenced_message"] = referenced_message
        if interaction is not None:
            message.update(interaction)

        self._messages[message_id] = message
        channel = self.channel(channel_id)
        if isinstance(channel, GuildChannel):
            channel.last_message_id = message_id
            if channel.is_thread:
                channel.message_count += 1
        return message

    def _user_message_reference(
        self,
        channel_id: int,
        guild: StandinGuild | None,
        reference: int | Mapping[str, Any] | None,
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        if reference is None:
            return None, None
        if isinstance(reference, int):
            reference = {"type": 0, "message_id": str(reference), "channel_id": str(channel_id)}
            if guild is not None:
                reference["guild_id"] = str(guild.id)
        reference = dict(reference)
        referenced = self._messages.get(int(reference["message_id"]))
        return reference, copy.deepcopy(referenced) if referenced is not None else None

    def _user_attachment(self, channel_id: int, attachment: Mapping[str, Any]) -> dict[str, Any]:
        attachment_id = int(attachment.get("id") or self._ids.next())
        filename = str(attachment.get("filename", "file.bin"))
        url = f"{self.url}/attachments/{channel_id}/{attachment_id}/{filename}"
        result = {
            "id": str(attachment_id),
            "filename": filename,
            "size": 0,
            "url": url,
            "proxy_url": url,
            "content_type": "application/octet-stream",
        }
        result.update({key: value for key, value in attachment.items() if key != "id"})
        return result

    def _content_visible(self, message: dict[str, Any], has_intent: bool) -> bool:
        """Apply the documented MESSAGE_CONTENT rule: is the content sent, or emptied?

        Without the intent an app still gets the content of its own messages, of
        DMs with it, and of messages that mention it. (The fourth exception, the
        target of a message command, applies in ``resolved`` only.)
        """
        if has_intent:
            return True
        if message["author"]["id"] == str(self.bot.id):
            return True
        if int(message["channel_id"]) in self._dm_by_channel:
            return True
        return any(user["id"] == str(self.bot.id) for user in message.get("mentions", []))

    def _apply_content_rule(self, message: dict[str, Any], has_intent: bool) -> dict[str, Any]:
        visible = copy.deepcopy(message)
        if not self._content_visible(message, has_intent):
            visible["content"] = ""
            visible["embeds"] = []
            visible["attachments"] = []
            visible["components"] = []
            visible.pop("poll", None)
        referenced = visible.get("referenced_message")
        if referenced:
            visible["referenced_message"] = self._apply_content_rule(referenced, has_intent)
        return visible

    def _gateway_message(
        self, message: dict[str, Any], guild: StandinGuild | None
    ) -> dict[str, Any]:
        """Add the MESSAGE_CREATE extra fields: guild_id, member, and members in mentions."""
        event = copy.deepcopy(message)
        if guild is None or event.get("flags", 0) & MESSAGE_FLAG_EPHEMERAL:
            # Ephemeral messages carry neither guild_id nor member ("Messages" events).
            return event
        event["guild_id"] = str(guild.id)
        author = guild.member(int(event["author"]["id"]))
        if author is not None and event.get("webhook_id") is None:
            event["member"] = author.to_dict(with_user=False)
        for mentioned in event["mentions"]:
            member = guild.member(int(mentioned["id"]))
            if member is not None:
                mentioned["member"] = member.to_dict(with_user=False)
        return event

    async def _dispatch_message(
        self, event: str, message: dict[str, Any], guild: StandinGuild | None
    ) -> int:
        ephemeral = bool(message.get("flags", 0) & MESSAGE_FLAG_EPHEMERAL)
        # Ephemeral messages are tied to the DIRECT_MESSAGES intent.
        intent = (
            INTENT_GUILD_MESSAGES if guild is not None and not ephemeral else INTENT_DIRECT_MESSAGES
        )
        gateway_message = self._gateway_message(message, guild)

        def for_session(session: _Session) -> dict[str, Any]:
            return self._apply_content_rule(
                gateway_message, bool(session.intents & INTENT_MESSAGE_CONTENT)
            )

        return await self._dispatch(
            event,
            gateway_message,
            guild_id=guild.id if guild is not None and not ephemeral else None,
            intent=intent,
            per_session=for_session,
        )

    # Interactions: payloads and options

    def _registered_command(
        self, name: str, command_type: int, guild: StandinGuild | None
    ) -> dict[str, Any] | None:
        if guild is not None:
            found = self.command(name, guild_id=guild.id, command_type=command_type)
            if found is not None:
                return found
        return self.command(name, command_type=command_type)

    def _interaction_payload(
        self,
        interaction_id: int,
        token: str,
        data: dict[str, Any],
        channel: GuildChannel | DmChannel,
        guild: StandinGuild | None,
        user: DiscordUser,
        locale: str,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": INTERACTION_APPLICATION_COMMAND,
            "data": data,
            "channel_id": str(channel.id),
            "token": token,
            "version": 1,
            "locale": locale,
            "entitlements": [],
            "attachment_size_limit": ATTACHMENT_SIZE_LIMIT,
        }
        if guild is not None and isinstance(channel, GuildChannel):
            member = guild.member(user.id)
            member_data = (member or GuildMember(user)).to_dict()
            member_data["permissions"] = str(guild.permissions_of(user.id))
            payload.update(
                {
                    "guild_id": str(guild.id),
                    "guild": {
                        "id": str(guild.id),
                        "locale": guild.preferred_locale,
                        "features": [],
                    },
                    "channel": channel.to_dict(guild.id),
                    "member": member_data,
                    "app_permissions": str(guild.permissions_of(self.bot.id)),
                    "guild_locale": guild.preferred_locale,
                    "authorizing_integration_owners": {"0": str(guild.id)},
                    "context": INTERACTION_CONTEXT_GUILD,
                }
            )
        else:
            payload.update(
                {
                    "channel": channel.to_dict(),
                    "user": user.to_dict(),
                    # The documented app_permissions in a DM with the bot.
                    "app_permissions": str(
                        PERMISSION_ATTACH_FILES
                        | PERMISSION_EMBED_LINKS
                        | PERMISSION_MENTION_EVERYONE
                        | PERMISSION_USE_EXTERNAL_EMOJIS
                    ),
                    "authorizing_integration_owners": {"0": "0"},
                    "context": INTERACTION_CONTEXT_BOT_DM,
                }
            )
        return payload

    def _interaction_options(
        self,
        options: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        registered: dict[str, Any] | None,
        guild: StandinGuild | None,
        resolved: dict[str, dict[str, Any]],
    ) -> list[dict[str, Any]]:
        if isinstance(options, Mapping):
            declared = {option["name"]: option for option in (registered or {}).get("options", [])}
            built = []
            for name, value in options.items():
                option_type = declared[name]["type"] if name in declared else _option_type_of(value)
                built.append({"name": name, "type": option_type, "value": _option_value(value)})
        else:
            built = [dict(option) for option in options]
        self._resolve_options(built, guild, resolved)
        return built

    def _resolve_options(
        self,
        options: list[dict[str, Any]],
        guild: StandinGuild | None,
        resolved: dict[str, dict[str, Any]],
    ) -> None:
        for option in options:
            if "options" in option:
                option["options"] = [dict(inner) for inner in option["options"]]
                self._resolve_options(option["options"], guild, resolved)
                continue
            option_type = option.get("type")
            if option_type not in (OPTION_USER, OPTION_CHANNEL, OPTION_ROLE, OPTION_MENTIONABLE):
                continue
            value = int(option["value"])
            if option_type in (OPTION_USER, OPTION_MENTIONABLE) and value in self._users:
                self._resolve_user(value, guild, resolved)
            if option_type in (OPTION_ROLE, OPTION_MENTIONABLE) and guild is not None:
                role = guild.role(value)
                if role is not None:
                    resolved.setdefault("roles", {})[str(value)] = role.to_dict()
            if option_type == OPTION_CHANNEL:
                channel = self.channel(value)
                if isinstance(channel, GuildChannel):
                    partial = channel.to_dict(guild.id if guild is not None else None)
                    partial["permissions"] = str(ALL_PERMISSIONS)
                    resolved.setdefault("channels", {})[str(value)] = partial

    def _resolve_user(
        self, user_id: int, guild: StandinGuild | None, resolved: dict[str, dict[str, Any]]
    ) -> None:
        user = self._users[user_id]
        resolved.setdefault("users", {})[str(user_id)] = user.to_dict()
        member = guild.member(user_id) if guild is not None else None
        if member is not None:
            # Resolved members are partial: no user, deaf or mute.
            partial = member.to_dict(with_user=False)
            partial.pop("deaf")
            partial.pop("mute")
            partial["permissions"] = str(guild.permissions_of(user_id))  # type: ignore[union-attr]
            resolved.setdefault("members", {})[str(user_id)] = partial

    def _resolve_target(
        self,
        command_type: int,
        target_id: int,
        guild: StandinGuild | None,
        resolved: dict[str, dict[str, Any]],
    ) -> None:
        if command_type == COMMAND_USER:
            if target_id not in self._users:
                raise ValueError(f"Unknown target user {target_id}: add_user() it first.")
            self._resolve_user(target_id, guild, resolved)
        elif command_type == COMMAND_MESSAGE:
            target = self._messages.get(target_id)
            if target is None:
                raise ValueError(f"Unknown target message {target_id}: send it first.")
            # The target of a message command keeps its content without MESSAGE_CONTENT.
            resolved["messages"] = {str(target_id): copy.deepcopy(target)}
        else:
            raise ValueError(f"Unsupported command type {command_type}.")

    # Gateway: dispatch and sessions

    async def _dispatch(
        self,
        event: str,
        data: dict[str, Any],
        *,
        guild_id: int | None,
        intent: int,
        per_session: Callable[[_Session], dict[str, Any]] | None = None,
    ) -> int:
        if not self._sessions:
            raise RuntimeError(
                f"No gateway session to send {event} to: start the client and await "
                "server.wait_until_connected() first."
            )
        delivered = 0
        for session in list(self._sessions.values()):
            if not session.receives(guild_id=guild_id, intent=intent):
                continue
            session_data = per_session(session) if per_session is not None else copy.deepcopy(data)
            await self._dispatch_to_session(session, event, session_data)
            delivered += 1
        if delivered == 0:
            logger.info("%s reached no session: intents or shard exclude it", event)
        self._notify()
        return delivered

    async def _dispatch_to_session(
        self, session: _Session, event: str, data: dict[str, Any]
    ) -> None:
        session.sequence += 1
        payload = {"op": OP_DISPATCH, "d": data, "s": session.sequence, "t": event}
        session.log.append(payload)
        self.events.append(DispatchedEvent(session.session_id, session.sequence, event, data))
        if session.connection is not None:
            await self._send_safely(session.connection, payload)

    async def _send_safely(self, connection: _Connection, payload: dict[str, Any]) -> None:
        try:
            await connection.send(payload)
        except ConnectionError as error:
            logger.warning(
                "Sending %s failed on gateway session %s: %s",
                payload.get("t") or f"op {payload['op']}",
                connection.record.session_id,
                error,
            )

    def _live_connections(self) -> list[_Connection]:
        return [connection for connection in self._connections if connection.open]

    def _detach(self, connection: _Connection) -> None:
        session = connection.session
        if session is not None and session.connection is connection:
            session.connection = None
        connection.session = None
        self._update_connected()

    def _end_session(self, session: _Session) -> None:
        self._sessions.pop(session.session_id, None)
        if session.connection is not None:
            session.connection.session = None
            session.connection = None
        self._update_connected()

    def _update_connected(self) -> None:
        if any(session.connection is not None for session in self._sessions.values()):
            self.connected.set()
        else:
            self.connected.clear()
        self._notify()

    def _guilds_of_shard(self, session: _Session) -> list[StandinGuild]:
        return [
            guild
            for guild in self.guilds.values()
            if (guild.id >> 22) % session.shard_count == session.shard_id
        ]

    def _guild_create(self, guild: StandinGuild, session: _Session) -> dict[str, Any]:
        """Build GUILD_CREATE for a session, with the member list its intents allow.

        Without GUILD_PRESENCES only the bot is listed (no one is in voice). With
        it, guilds above large_threshold list members that have a role or a nickname;
        no member is online here.
        """
        large = len(guild.members) > session.large_threshold
        if not session.intents & INTENT_GUILD_PRESENCES:
            members = [member for member in guild.members if member.user.id == self.bot.id]
        elif large:
            members = [member for member in guild.members if member.roles or member.nick]
        else:
            members = list(guild.members)
        permissions = guild.permissions_of(self.bot.id)
        threads = [
            channel.to_dict(guild.id, member_id=self.bot.id)
            for channel in guild.channels
            if channel.is_thread
            and not channel.archived
            and (
                channel.type != CHANNEL_PRIVATE_THREAD
                or self.bot.id in channel.member_ids
                or permissions & PERMISSION_MANAGE_THREADS
            )
        ]
        return {
            "id": str(guild.id),
            "name": guild.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "owner_id": str(guild.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "widget_enabled": False,
            "verification_level": 0,
            "default_message_notifications": 1,
            "explicit_content_filter": 0,
            "roles": [role.to_dict() for role in guild.roles],
            "emojis": [],
            "features": [],
            "mfa_level": 0,
            "application_id": None,
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "max_presences": None,
            "max_members": 500_000,
            "vanity_url_code": None,
            "description": None,
            "banner": None,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "preferred_locale": guild.preferred_locale,
            "public_updates_channel_id": None,
            "max_video_channel_users": 25,
            "max_stage_video_channel_users": 50,
            "nsfw_level": 0,
            "stickers": [],
            "premium_progress_bar_enabled": False,
            "safety_alerts_channel_id": None,
            "incidents_data": None,
            "joined_at": guild.joined_at,
            "large": large,
            "unavailable": False,
            "member_count": len(guild.members),
            "voice_states": [],
            "members": [member.to_dict() for member in members],
            "channels": [channel.to_dict() for channel in guild.channels if not channel.is_thread],
            "threads": threads,
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }

    # Gateway: the websocket handler

    async def _handle_gateway(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        encoding = query.get("encoding", "json")
        if encoding != "json":
            return web.Response(
                status=400,
                text=(
                    f"encoding={encoding!r} is not supported by the Discord stand-in; "
                    "connect with encoding=json."
                ),
            )
        compress = query.get("compress")
        if compress not in (None, "zlib-stream"):
            return web.Response(
                status=400,
                text=(
                    f"compress={compress!r} is not supported by the Discord stand-in; "
                    "use compress=zlib-stream or leave it out."
                ),
            )

        ws = web.WebSocketResponse(max_msg_size=1024 * 1024)
        await ws.prepare(request)
        record = GatewayConnection(path=request.path, query=query, compress=compress)
        self.gateway_connections.append(record)
        connection = _Connection(ws, record)
        self._connections.append(connection)
        logger.info("Gateway connection opened on %s (compress=%s)", request.path, compress)

        try:
            await connection.send(
                {
                    "op": OP_HELLO,
                    "d": {"heartbeat_interval": self.heartbeat_interval_ms},
                    "s": None,
                    "t": None,
                }
            )
            if query.get("v") not in ("9", "10"):
                await connection.close(CLOSE_INVALID_API_VERSION)
            else:
                await self._receive_loop(connection)
        finally:
            self._connection_closed(connection)
        return ws

    async def _receive_loop(self, connection: _Connection) -> None:
        async for message in connection.ws:
            if message.type == WSMsgType.ERROR:
                logger.warning("Gateway connection failed: %s", connection.ws.exception())
                return
            if message.type != WSMsgType.TEXT:
                # Binary frames would be ETF, which this stand-in does not decode.
                await connection.close(CLOSE_DECODE_ERROR)
                return
            if len(message.data.encode()) > MAX_GATEWAY_PAYLOAD_BYTES:
                await connection.close(CLOSE_DECODE_ERROR)
                return
            try:
                payload = json.loads(message.data)
            except json.JSONDecodeError:
                await connection.close(CLOSE_DECODE_ERROR)
                return
            if not isinstance(payload, dict) or not isinstance(payload.get("op"), int):
                await connection.close(CLOSE_DECODE_ERROR)
                return
            try:
                await self._handle_gateway_payload(connection, payload)
            except (KeyError, TypeError, ValueError) as error:
                # A field of the payload had the wrong type or shape.
                logger.warning(
                    "Invalid gateway payload with op %s on session %s: %r",
                    payload["op"],
                    connection.record.session_id,
                    error,
                )
                await connection.close(CLOSE_DECODE_ERROR)
                return
            if not connection.open:
                return

    def _connection_closed(self, connection: _Connection) -> None:
        record = connection.record
        if record.closed_by is None:
            record.closed_by = "client"
            record.close_code = connection.ws.close_code
        session = connection.session
        if (
            session is not None
            and record.closed_by == "client"
            and record.close_code in SESSION_ENDING_CLOSE_CODES
        ):
            self._end_session(session)
        else:
            self._detach(connection)
        if connection in self._connections:
            self._connections.remove(connection)
        logger.info(
            "Gateway connection closed by %s with code %s (session %s)",
            record.closed_by,
            record.close_code,
            record.session_id,
        )
        self._notify()

    async def _handle_gateway_payload(
        self, connection: _Connection, payload: dict[str, Any]
    ) -> None:
        op = payload["op"]
        data = payload.get("d")
        if op == OP_HEARTBEAT:
            self.heartbeats.append(data)
            await connection.send({"op": OP_HEARTBEAT_ACK, "d": None, "s": None, "t": None})
            self.heartbeat_acks += 1
            self._notify()
            return
        # NOTE: heartbeats do not count toward the 120 events per minute, so that tests can use
        # short heartbeat intervals. The documentation does not say whether Discord counts them.
        if not connection.count_event(asyncio.get_running_loop().time()):
            await connection.close(CLOSE_RATE_LIMITED)
            return
        if op == OP_IDENTIFY:
            await self._identify(connection, data)
        elif op == OP_RESUME:
            await self._resume(connection, data)
        elif op in (
            OP_PRESENCE_UPDATE,
            OP_VOICE_STATE_UPDATE,
            OP_REQUEST_GUILD_MEMBERS,
            OP_REQUEST_SOUNDBOARD_SOUNDS,
        ):
            if connection.session is None:
                await connection.close(CLOSE_NOT_AUTHENTICATED)
                return
            await self._handle_session_request(connection, op, data)
        else:
            await connection.close(CLOSE_UNKNOWN_OPCODE)

    async def _handle_session_request(self, connection: _Connection, op: int, data: Any) -> None:
        session = connection.session
        assert session is not None
        if not isinstance(data, dict):
            await connection.close(CLOSE_DECODE_ERROR)
            return
        if op == OP_PRESENCE_UPDATE:
            self.presence_updates.append(data)
        elif op == OP_REQUEST_GUILD_MEMBERS:
            self.member_requests.append(data)
            await self._send_member_chunk(session, data)
        elif op == OP_REQUEST_SOUNDBOARD_SOUNDS:
            for guild_id in data.get("guild_ids", []):
                await self._dispatch_to_session(
                    session,
                    "SOUNDBOARD_SOUNDS",
                    {"guild_id": str(guild_id), "soundboard_sounds": []},
                )
        self._notify()

    async def _send_member_chunk(self, session: _Session, request: dict[str, Any]) -> None:
        guild = self.guilds.get(int(request.get("guild_id", 0)))
        if guild is None:
            return
        user_ids = request.get("user_ids")
        if user_ids is not None:
            wanted = {
                int(user_id)
                for user_id in ([user_ids] if isinstance(user_ids, (str, int)) else user_ids)
            }
            members = [member for member in guild.members if member.user.id in wanted]
            not_found = sorted(wanted - {member.user.id for member in members})
        else:
            query = str(request.get("query", "")).lower()
            limit = int(request.get("limit", 0))
            if query == "" and not session.intents & INTENT_GUILD_MEMBERS:
                # The whole member list needs GUILD_MEMBERS ("Request Guild Members").
                members = []
            else:
                members = [
                    member
                    for member in guild.members
                    if member.user.username.lower().startswith(query)
                ]
            if limit:
                members = members[:limit]
            not_found = []
        chunk: dict[str, Any] = {
            "guild_id": str(guild.id),
            "members": [member.to_dict() for member in members],
            "chunk_index": 0,
            "chunk_count": 1,
        }
        if not_found:
            chunk["not_found"] = [str(user_id) for user_id in not_found]
        if request.get("nonce") is not None:
            chunk["nonce"] = request["nonce"]
        await self._dispatch_to_session(session, "GUILD_MEMBERS_CHUNK", chunk)

    async def _identify(self, connection: _Connection, data: Any) -> None:
        if connection.session is not None:
            await connection.close(CLOSE_ALREADY_AUTHENTICATED)
            return
        if not isinstance(data, dict) or not isinstance(data.get("properties"), dict):
            await connection.close(CLOSE_DECODE_ERROR)
            return
        self.identify = data
        self.identifies.append(data)
        self._notify()
        if data.get("token") != self.token:
            await connection.close(CLOSE_AUTHENTICATION_FAILED)
            return
        intents = data.get("intents")
        if (
            not isinstance(intents, int)
            or isinstance(intents, bool)
            or intents < 0
            or intents & ~DEFINED_INTENTS
        ):
            await connection.close(CLOSE_INVALID_INTENTS)
            return
        if intents & PRIVILEGED_INTENTS & ~self.intents_allowed:
            logger.info(
                "IDENTIFY asked for privileged intents %s that are not allowed",
                intents & PRIVILEGED_INTENTS & ~self.intents_allowed,
            )
            await connection.close(CLOSE_DISALLOWED_INTENTS)
            return
        shard = data.get("shard", [0, 1])
        if (
            not isinstance(shard, list)
            or len(shard) != 2
            or not all(isinstance(part, int) for part in shard)
            or not 0 <= shard[0] < shard[1]
        ):
            await connection.close(CLOSE_INVALID_SHARD)
            return

        session = _Session(
            session_id=uuid.uuid4().hex,
            intents=intents,
            shard_id=shard[0],
            shard_count=shard[1],
            # Documented range 50 to 250, default 50.
            large_threshold=min(max(int(data.get("large_threshold", 50)), 50), 250),
        )
        self._session_starts += 1
        self._sessions[session.session_id] = session
        self._attach(connection, session)
        ready: dict[str, Any] = {
            "v": API_VERSION,
            "user": self._current_user(),
            "guilds": [
                {"id": str(guild.id), "unavailable": True}
                for guild in self._guilds_of_shard(session)
            ],
            "session_id": session.session_id,
            "resume_gateway_url": self.resume_gateway_url,
            "application": {"id": str(self.application_id), "flags": self.application_flags},
            "private_channels": [],
        }
        if "shard" in data:
            ready["shard"] = shard
        await self._dispatch_to_session(session, "READY", ready)
        if intents & INTENT_GUILDS:
            for guild in self._guilds_of_shard(session):
                await self._dispatch_to_session(
                    session, "GUILD_CREATE", self._guild_create(guild, session)
                )
        logger.info("Gateway session %s identified with intents %s", session.session_id, intents)
        self._update_connected()

    async def _resume(self, connection: _Connection, data: Any) -> None:
        if not isinstance(data, dict):
            await connection.close(CLOSE_DECODE_ERROR)
            return
        self.resumes.append(data)
        self._notify()
        if data.get("token") != self.token:
            await connection.close(CLOSE_AUTHENTICATION_FAILED)
            return
        session = self._sessions.get(str(data.get("session_id")))
        if session is None:
            # The session ended or never existed: the client must identify anew.
            await connection.send({"op": OP_INVALID_SESSION, "d": False, "s": None, "t": None})
            return
        seq = data.get("seq")
        if not isinstance(seq, int) or seq > session.sequence:
            await connection.close(CLOSE_INVALID_SEQ)
            return
        if session.connection is not None and session.connection is not connection:
            old = session.connection
            self._detach(old)
            await old.close(CLOSE_UNKNOWN_ERROR, "Session resumed on another connection")
        self._attach(connection, session)
        connection.record.resumed = True
        for missed in [event for event in session.log if event["s"] > seq]:
            await self._send_safely(connection, missed)
        await self._dispatch_to_session(session, "RESUMED", {})
        logger.info("Gateway session %s resumed after seq %s", session.session_id, seq)
        self._update_connected()

    def _attach(self, connection: _Connection, session: _Session) -> None:
        connection.session = session
        connection.record.session_id = session.session_id
        session.connection = connection

    def _current_user(self) -> dict[str, Any]:
        user = self.bot.to_dict()
        user.update(
            {"verified": True, "mfa_enabled": False, "email": None, "flags": 0, "locale": "en-US"}
        )
        return user

    # REST: routing

    def _build_routes(self) -> list[_Route]:
        table: list[tuple[str, str, _Handler, bool]] = [
            ("GET", "/gateway", self._get_gateway, False),
            ("GET", "/gateway/bot", self._get_gateway_bot, True),
            ("GET", "/users/@me", self._get_current_user, True),
            ("GET", "/users/{user_id}", self._get_user, True),
            ("POST", "/users/@me/channels", self._create_dm, True),
            ("GET", "/oauth2/applications/@me", self._get_application, True),
            ("GET", "/applications/@me", self._get_application, True),
            ("GET", "/channels/{channel_id}", self._get_channel, True),
            ("POST", "/channels/{channel_id}/messages", self._create_message, True),
            ("GET", "/channels/{channel_id}/messages/{message_id}", self._get_message, True),
            ("PATCH", "/channels/{channel_id}/messages/{message_id}", self._edit_message, True),
            ("DELETE", "/channels/{channel_id}/messages/{message_id}", self._delete_message, True),
            ("POST", "/channels/{channel_id}/typing", self._trigger_typing, True),
            ("POST", "/channels/{channel_id}/threads", self._start_thread, True),
            (
                "POST",
                "/channels/{channel_id}/messages/{message_id}/threads",
                self._start_thread_from_message,
                True,
            ),
            (
                "PUT",
                "/channels/{channel_id}/thread-members/{user_id}",
                self._add_thread_member,
                True,
            ),
            ("GET", "/applications/{application_id}/commands", self._get_commands, True),
            ("PUT", "/applications/{application_id}/commands", self._overwrite_commands, True),
            (
                "GET",
                "/applications/{application_id}/guilds/{guild_id}/commands",
                self._get_commands,
                True,
            ),
            (
                "PUT",
                "/applications/{application_id}/guilds/{guild_id}/commands",
                self._overwrite_commands,
                True,
            ),
            (
                "POST",
                "/interactions/{interaction_id}/{interaction_token}/callback",
                self._interaction_callback,
                False,
            ),
            (
                "POST",
                "/webhooks/{application_id}/{interaction_token}",
                self._create_followup,
                False,
            ),
            (
                "GET",
                "/webhooks/{application_id}/{interaction_token}/messages/@original",
                self._get_original,
                False,
            ),
            (
                "PATCH",
                "/webhooks/{application_id}/{interaction_token}/messages/@original",
                self._edit_original,
                False,
            ),
            (
                "DELETE",
                "/webhooks/{application_id}/{interaction_token}/messages/@original",
                self._delete_original,
                False,
            ),
            (
                "PATCH",
                "/webhooks/{application_id}/{interaction_token}/messages/{message_id}",
                self._edit_followup,
                False,
            ),
        ]
        return [
            _Route(method, template, _route_pattern(template), handler, needs_bot_token)
            for method, template, handler, needs_bot_token in table
        ]

    def _match_route(self, method: str, path: str) -> tuple[_Route, dict[str, str]]:
        path_matched = False
        for route in self._routes:
            match = route.pattern.match(path)
            if match is None:
                continue
            path_matched = True
            if route.method == method:
                return route, match.groupdict()
        raise _method_not_allowed() if path_matched else _not_found_route()

    async def _handle_rest(self, request: web.Request) -> web.StreamResponse:
        call = ApiCall(
            method=request.method, path=request.path, route=None, query=dict(request.query)
        )
        self.calls.append(call)
        bucket = _bucket_hash(f"{request.method} {request.path}")
        try:
            prefix = f"/api/v{API_VERSION}"
            if not request.path.startswith(prefix + "/"):
                raise _not_found_route()
            route, params = self._match_route(request.method, request.path[len(prefix) :])
            call.route = route.key
            bucket = _bucket_hash(route.key)
            authorization = request.headers.get("Authorization")
            if route.needs_bot_token and authorization != f"Bot {self.token}":
                raise _unauthorized()
            body, files = await _read_body(request)
            call.body = body
            self._raise_scripted_fault(route.key, bucket)
            parsed = _Call(params, request.query, body, files)
            reply = await route.handler(parsed)
            response = _json_response(reply.status, reply.body)
            response.headers.update(_rate_limit_headers(bucket))
        except ApiError as error:
            response = _json_response(error.status, error.body())
            if error.status != 429:
                response.headers.update(_rate_limit_headers(bucket))
            response.headers.update(error.headers)
            call.error_code = error.code if error.status != 429 else None
        call.status = response.status
        # NOTE: discord.py 2.7 takes a 429 without a Via header for a Cloudflare ban and
        # does not retry it. Discord's responses carry this header; its documentation
        # does not mention it.
        response.headers["Via"] = "1.1 google"
        self._notify()
        return response

    def _raise_scripted_fault(self, route_key: str, bucket: str) -> None:
        faults = self._faults.get(route_key)
        if not faults:
            return
        fault = faults.popleft()
        if isinstance(fault, RateLimit):
            raise fault.to_error(bucket)
        raise fault

    async def _handle_attachment(self, request: web.Request) -> web.StreamResponse:
        key = (int(request.match_info["channel_id"]), int(request.match_info["attachment_id"]))
        content = self._attachments.get(key)
        if content is None:
            return web.Response(status=404, text="Not Found")
        return web.Response(body=content, content_type="application/octet-stream")

    # REST: gateway, users, application

    async def _get_gateway(self, call: _Call) -> _Reply:
        return _Reply(200, {"url": self.gateway_url})

    async def _get_gateway_bot(self, call: _Call) -> _Reply:
        return _Reply(
            200,
            {
                "url": self.gateway_url,
                "shards": self.recommended_shards,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": max(0, 1000 - self._session_starts),
                    "reset_after": 14_400_000,
                    "max_concurrency": 1,
                },
            },
        )

    async def _get_current_user(self, call: _Call) -> _Reply:
        return _Reply(200, self._current_user())

    async def _get_user(self, call: _Call) -> _Reply:
        user = self._users.get(call.param_id("user_id"))
        if user is None:
            raise _unknown_user()
        return _Reply(200, user.to_dict())

    async def _get_application(self, call: _Call) -> _Reply:
        owner = next(iter(self.guilds.values())).owner_id if self.guilds else GUILD_OWNER.id
        owner_user = self._users.get(owner, GUILD_OWNER)
        return _Reply(
            200,
            {
                "id": str(self.application_id),
                "name": self.bot.username,
                "icon": None,
                "description": "MindHarbor test application",
                "summary": "",
                "type": None,
                "bot": self.bot.to_dict(),
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": owner_user.to_dict(),
                "team": None,
                "verify_key": hashlib.sha256(str(self.application_id).encode()).hexdigest(),
                "flags": self.application_flags,
                "approximate_guild_count": len(self.guilds),
                "approximate_user_install_count": 0,
                "redirect_uris": [],
                "interactions_endpoint_url": None,
                "role_connections_verification_url": None,
                "tags": [],
                "integration_types_config": {"0": {}},
            },
        )

    async def _create_dm(self, call: _Call) -> _Reply:
        body = call.json_object()
        recipient_id = body.get("recipient_id")
        if recipient_id is None:
            raise invalid_form_body("recipient_id", "BASE_TYPE_REQUIRED", "This field is required")
        user = self._users.get(int(recipient_id))
        if user is None:
            raise _unknown_user()
        return _Reply(200, self.create_dm_channel(user).to_dict())

    # REST: channels and messages

    def _text_channel(
        self, channel_id: int
    ) -> tuple[GuildChannel | DmChannel, StandinGuild | None]:
        channel = self.channel(channel_id)
        if channel is None:
            raise _unknown_channel()
        if isinstance(channel, GuildChannel) and channel.type not in TEXT_CHANNEL_TYPES:
            raise ApiError(400, 50008, "Cannot send messages in a non-text channel")
        return channel, self.guild_of_channel(channel_id)

    async def _get_channel(self, call: _Call) -> _Reply:
        channel_id = call.param_id("channel_id")
        channel = self.channel(channel_id)
        if channel is None:
            raise _unknown_channel()
        if isinstance(channel, DmChannel):
            return _Reply(200, channel.to_dict())
        guild = self.guild_of_channel(channel_id)
        return _Reply(
            200, channel.to_dict(guild.id if guild is not None else None, member_id=self.bot.id)
        )

    async def _create_message(self, call: _Call) -> _Reply:
        channel_id = call.param_id("channel_id")
        _, guild = self._text_channel(channel_id)
        body = call.json_object()
        sent = await self._create_bot_message(
            channel_id,
            guild,
            body,
            call.files,
            source="channel",
            default_parse=("users", "roles", "everyone"),
        )
        return _Reply(200, self._messages[sent.id])

    async def _create_bot_message(
        self,
        channel_id: int,
        guild: StandinGuild | None,
        body: dict[str, Any],
        files: list[tuple[str, str, bytes, str | None]],
        *,
        source: str,
        default_parse: tuple[str, ...],
        field_prefix: str = "",
        interaction: InteractionRecord | None = None,
        message_type: int | None = None,
        forced_flags: int = 0,
        allow_empty: bool = False,
    ) -> SentMessage:
        """Validate a body, then store, record and dispatch (MESSAGE_CREATE) a bot message."""
        _validate_message_body(
            body, has_files=bool(files), field_prefix=field_prefix, allow_empty=allow_empty
        )
        content = str(body.get("content") or "")
        reference, referenced = self._bot_message_reference(
            channel_id, body.get("message_reference")
        )

        message_id = self._ids.next()
        attachments = self._store_files(channel_id, body, files)
        interaction_fields = (
            self._interaction_message_fields(interaction) if interaction is not None else None
        )
        if message_type is None:
            message_type = MESSAGE_REPLY if reference is not None else MESSAGE_DEFAULT
        message = self._new_message(
            channel_id=channel_id,
            guild=guild,
            author=self.bot,
            content=content,
            embeds=list(body.get("embeds") or []),
            components=list(body.get("components") or []),
            attachments=attachments,
            flags=int(body.get("flags") or 0) | forced_flags,
            tts=bool(body.get("tts", False)),
            message_type=message_type,
            message_reference=reference,
            referenced_message=referenced,
            message_id=message_id,
            interaction=interaction_fields,
            nonce=body.get("nonce"),
        )

        sent = SentMessage(
            id=message_id,
            channel_id=channel_id,
            guild_id=guild.id if guild is not None else None,
            author=self.bot,
            content=content,
            embeds=message["embeds"],
            components=message["components"],
            attachments=attachments,
            allowed_mentions=body.get("allowed_mentions"),
            message_reference=reference,
            flags=message["flags"],
            tts=message["tts"],
            pings=self._pings(
                content, body.get("allowed_mentions"), default_parse, guild, referenced
            ),
            source=source,
            interaction_id=interaction.id if interaction is not None else None,
            files={filename: content_bytes for _, filename, content_bytes, _ in files},
        )
        self.messages.append(sent)
        self._sent_by_id[message_id] = sent
        await self._dispatch_if_connected("MESSAGE_CREATE", message, guild)
        self._notify()
        return sent

    async def _dispatch_if_connected(
        self, event: str, message: dict[str, Any], guild: StandinGuild | None
    ) -> None:
        # REST calls can come from a client that never opened the gateway.
        if self._sessions:
            await self._dispatch_message(event, message, guild)

    def _interaction_message_fields(self, interaction: InteractionRecord) -> dict[str, Any]:
        return {
            "webhook_id": str(self.application_id),
            "application_id": str(self.application_id),
            "interaction_metadata": {
                "id": str(interaction.id),
                "type": INTERACTION_APPLICATION_COMMAND,
                "user": interaction.user.to_dict(),
                "authorizing_integration_owners": interaction.payload[
                    "authorizing_integration_owners"
                ],
                "name": interaction.name,
                "command_type": interaction.command_type,
            },
            "interaction": {
                "id": str(interaction.id),
                "type": INTERACTION_APPLICATION_COMMAND,
                "name": interaction.name,
                "user": interaction.user.to_dict(),
            },
        }

    def _bot_message_reference(
        self, channel_id: int, reference: Any
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        if reference is None:
            return None, None
        if not isinstance(reference, dict) or "message_id" not in reference:
            raise invalid_form_body(
                "message_reference.message_id", "BASE_TYPE_REQUIRED", "This field is required"
            )
        referenced = self._messages.get(int(reference["message_id"]))
        if referenced is None or int(referenced["channel_id"]) != int(
            reference.get("channel_id") or channel_id
        ):
            if reference.get("fail_if_not_exists", True):
                # NOTE: this error body is the one Discord returns in practice; the
                # documentation names only fail_if_not_exists.
                raise invalid_form_body(
                    "message_reference", "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message"
                )
            return None, None
        stored = dict(reference)
        stored.setdefault("type", 0)
        # Discord returns snowflakes as strings, whichever form the request used.
        stored["message_id"] = referenced["id"]
        stored["channel_id"] = referenced["channel_id"]
        if stored.get("guild_id") is not None:
            stored["guild_id"] = str(stored["guild_id"])
        return stored, copy.deepcopy(referenced)

    def _store_files(
        self, channel_id: int, body: dict[str, Any], files: list[tuple[str, str, bytes, str | None]]
    ) -> list[dict[str, Any]]:
        """Turn uploaded files[n] parts into attachment objects, with their descriptions."""
        described = {
            str(item.get("id")): item
            for item in body.get("attachments") or []
            if isinstance(item, dict)
        }
        attachments = []
        for field_name, filename, content, content_type in files:
            index = field_name.removeprefix("files[").removesuffix("]")
            attachment_id = self._ids.next()
            self._attachments[(channel_id, attachment_id)] = content
            url = f"{self.url}/attachments/{channel_id}/{attachment_id}/{filename}"
            attachment: dict[str, Any] = {
                "id": str(attachment_id),
                "filename": described.get(index, {}).get("filename", filename),
                "size": len(content),
                "url": url,
                "proxy_url": url,
                "content_type": content_type or "application/octet-stream",
            }
            if described.get(index, {}).get("description"):
                attachment["description"] = described[index]["description"]
            attachments.append(attachment)
        return attachments

    def _pings(
        self,
        content: str,
        allowed_mentions: Any,
        default_parse: tuple[str, ...],
        guild: StandinGuild | None,
        referenced: dict[str, Any] | None,
    ) -> Pings:
        """Work out who a message notifies, by the documented allowed_mentions rules.

        Without allowed_mentions, regular messages parse users, roles and everyone,
        and interaction responses and webhooks parse users only. A role ping needs
        a mentionable role or MENTION_EVERYONE; @everyone and @here need
        MENTION_EVERYONE. A reply pings its author only with replied_user true.
        """
        rules = (
            allowed_mentions
            if isinstance(allowed_mentions, dict)
            else {"parse": list(default_parse)}
        )
        parse = set(rules.get("parse") or [])
        listed_users = {int(user_id) for user_id in rules.get("users") or []}
        listed_roles = {int(role_id) for role_id in rules.get("roles") or []}
        bot_permissions = guild.permissions_of(self.bot.id) if guild is not None else 0
        can_mention_everyone = bool(bot_permissions & PERMISSION_MENTION_EVERYONE)

        users = {
            int(user_id)
            for user_id in _USER_MENTION.findall(content)
            if "users" in parse or int(user_id) in listed_users
        }
        roles = set()
        for role_id in map(int, _ROLE_MENTION.findall(content)):
            role = guild.role(role_id) if guild is not None else None
            if role is None or not ("roles" in parse or role_id in listed_roles):
                continue
            if role.mentionable or can_mention_everyone:
                roles.add(role_id)
        everyone = (
            guild is not None
            and "everyone" in parse
            and can_mention_everyone
            and bool(_EVERYONE_MENTION.search(content))
        )
        if referenced is not None and rules.get("replied_user") is True:
            replied_author = int(referenced["author"]["id"])
            if replied_author != self.bot.id:
                users.add(replied_author)
        users.discard(self.bot.id)
        return Pings(everyone=everyone, users=frozenset(users), roles=frozenset(roles))

    async def _get_message(self, call: _Call) -> _Reply:
        message = self._stored_message(call.param_id("channel_id"), call.param_id("message_id"))
        # REST follows the intents enabled for the app, not those passed in IDENTIFY.
        has_intent = bool(self.intents_allowed & INTENT_MESSAGE_CONTENT)
        return _Reply(200, self._apply_content_rule(message, has_intent))

    def _stored_message(self, channel_id: int, message_id: int) -> dict[str, Any]:
        if self.channel(channel_id) is None:
            raise _unknown_channel()
        message = self._messages.get(message_id)
        if message is None or int(message["channel_id"]) != channel_id:
            raise _unknown_message()
        return message

    async def _edit_message(self, call: _Call) -> _Reply:
        channel_id = call.param_id("channel_id")
        message = self._stored_message(channel_id, call.param_id("message_id"))
        if message["author"]["id"] != str(self.bot.id):
            raise ApiError(403, 50005, "Cannot edit a message authored by another user")
        body = call.json_object()
        await self._apply_edit(message, body, call.files, field_prefix="")
        return _Reply(200, message)

    async def _apply_edit(
        self,
        message: dict[str, Any],
        body: dict[str, Any],
        files: list[tuple[str, str, bytes, str | None]],
        *,
        field_prefix: str,
        finishes_loading: bool = False,
    ) -> None:
        """Apply an edit body to a stored bot message and its record; dispatch MESSAGE_UPDATE."""
        if (
            body.get("content") is not None
            and len(str(body["content"])) > MAX_MESSAGE_CONTENT_LENGTH
        ):
            raise _content_too_long(f"{field_prefix}content")
        if body.get("embeds") is not None and len(body["embeds"]) > MAX_EMBEDS:
            raise invalid_form_body(
                f"{field_prefix}embeds",
                "BASE_TYPE_MAX_LENGTH",
                f"Must be {MAX_EMBEDS} or fewer in length.",
            )

        channel_id = int(message["channel_id"])
        for name in ("content", "embeds", "components"):
            if name in body and body[name] is not None:
                message[name] = body[name]
        if "flags" in body and body["flags"] is not None:
            # An edit can set or clear SUPPRESS_EMBEDS only ("Edit Message").
            suppress = int(body["flags"]) & MESSAGE_FLAG_SUPPRESS_EMBEDS
            message["flags"] = (message["flags"] & ~MESSAGE_FLAG_SUPPRESS_EMBEDS) | suppress
        if files or "attachments" in body:
            message["attachments"] = self._store_files(channel_id, body, files)
        message["edited_timestamp"] = _iso(dt.datetime.now(dt.UTC))
        if finishes_loading:
            message["flags"] &= ~MESSAGE_FLAG_LOADING

        sent = self._sent_by_id.get(int(message["id"]))
        if sent is not None:
            if finishes_loading and sent.loading:
                # The first content of a deferred response notifies like a new message.
                sent.allowed_mentions = body.get("allowed_mentions")
                sent.pings = self._pings(
                    message["content"],
                    sent.allowed_mentions,
                    ("users",),
                    self.guild_of_channel(channel_id),
                    None,
                )
            sent.content = message["content"]
            sent.embeds = message["embeds"]
            sent.components = message["components"]
            sent.attachments = message["attachments"]
            sent.flags = message["flags"]
            sent.files.update({filename: content for _, filename, content, _ in files})
            sent.edits.append(copy.deepcopy(body))

        await self._dispatch_if_connected(
            "MESSAGE_UPDATE", message, self.guild_of_channel(channel_id)
        )
        self._notify()

    async def _delete_message(self, call: _Call) -> _Reply:
        channel_id = call.param_id("channel_id")
        message = self._stored_message(channel_id, call.param_id("message_id"))
        await self._delete_stored(message)
        return _Reply(204)

    async def _delete_stored(self, message: dict[str, Any]) -> None:
        message_id = int(message["id"])
        channel_id = int(message["channel_id"])
        del self._messages[message_id]
        sent = self._sent_by_id.get(message_id)
        if sent is not None:
            sent.deleted = True
        guild = self.guild_of_channel(channel_id)
        if self._sessions:
            event: dict[str, Any] = {"id": str(message_id), "channel_id": str(channel_id)}
            if guild is not None:
                event["guild_id"] = str(guild.id)
            intent = INTENT_GUILD_MESSAGES if guild is not None else INTENT_DIRECT_MESSAGES
            await self._dispatch(
                "MESSAGE_DELETE", event, guild_id=guild.id if guild else None, intent=intent
            )
        self._notify()

    async def _trigger_typing(self, call: _Call) -> _Reply:
        channel_id = call.param_id("channel_id")
        self._text_channel(channel_id)
        self.typing.append(channel_id)
        return _Reply(204)

    # REST: threads

    async def _start_thread(self, call: _Call) -> _Reply:
        channel_id = call.param_id("channel_id")
        parent, guild = self._thread_parent(channel_id)
        body = call.json_object()
        if call.query.get("use_nested_fields") or parent.type == CHANNEL_GUILD_FORUM:
            # NOTE: forum posts (a thread with its first message) are not implemented.
            raise ApiError(400, 0, "Forum channels are not supported by the Discord stand-in")
        thread_type = body.get("type")
        if thread_type is None:
            # In API v10 the thread type has no default ("Start Thread without Message").
            raise invalid_form_body("type", "BASE_TYPE_REQUIRED", "This field is required")
        allowed_types = (
            {CHANNEL_ANNOUNCEMENT_THREAD}
            if parent.type == CHANNEL_GUILD_ANNOUNCEMENT
            else {CHANNEL_PUBLIC_THREAD, CHANNEL_PRIVATE_THREAD}
        )
        if thread_type not in allowed_types:
            raise invalid_form_body(
                "type", "BASE_TYPE_CHOICES", f"Value must be one of {sorted(allowed_types)}."
            )
        thread = self._new_thread(self._ids.next(), parent, body, thread_type)
        return _Reply(201, await self._announce_thread(thread, guild))

    async def _start_thread_from_message(self, call: _Call) -> _Reply:
        channel_id = call.param_id("channel_id")
        parent, guild = self._thread_parent(channel_id)
        message = self._stored_message(channel_id, call.param_id("message_id"))
        message_id = int(message["id"])
        if message_id in self._thread_starters:
            raise ApiError(400, 160004, "A thread has already been created for this message")
        body = call.json_object()
        thread_type = (
            CHANNEL_ANNOUNCEMENT_THREAD
            if parent.type == CHANNEL_GUILD_ANNOUNCEMENT
            else CHANNEL_PUBLIC_THREAD
        )
        # A thread started from a message takes the message's id.
        thread = self._new_thread(message_id, parent, body, thread_type)
        self._thread_starters.add(message_id)
        return _Reply(201, await self._announce_thread(thread, guild))

    def _thread_parent(self, channel_id: int) -> tuple[GuildChannel, StandinGuild]:
        channel = self.channel(channel_id)
        guild = self.guild_of_channel(channel_id)
        if channel is None or guild is None or not isinstance(channel, GuildChannel):
            raise _unknown_channel()
        if channel.type not in (
            CHANNEL_GUILD_TEXT,
            CHANNEL_GUILD_ANNOUNCEMENT,
            CHANNEL_GUILD_FORUM,
        ):
            raise ApiError(400, 50024, "Cannot execute action on this channel type")
        return channel, guild

    def _new_thread(
        self, thread_id: int, parent: GuildChannel, body: dict[str, Any], thread_type: int
    ) -> GuildChannel:
        name = body.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= 100:
            raise invalid_form_body(
                "name", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
            )
        duration = body.get("auto_archive_duration") or 1440
        if duration not in THREAD_ARCHIVE_DURATIONS:
            raise invalid_form_body(
                "auto_archive_duration",
                "BASE_TYPE_CHOICES",
                f"Value must be one of {sorted(THREAD_ARCHIVE_DURATIONS)}.",
            )
        thread = GuildChannel(
            id=thread_id,
            name=name,
            type=thread_type,
            parent_id=parent.id,
            owner_id=self.bot.id,
            invitable=bool(body.get("invitable", True)),
            auto_archive_duration=duration,
            rate_limit_per_user=int(body.get("rate_limit_per_user") or 0),
            member_ids={self.bot.id},
        )
        return thread

    async def _announce_thread(self, thread: GuildChannel, guild: StandinGuild) -> dict[str, Any]:
        """Add a new thread to its guild, record it and dispatch THREAD_CREATE; return its object.

        NOTE: the creator's thread member object is included in the response and in
        THREAD_CREATE; the documentation mentions it only for users added to a thread.
        """
        guild.channels.append(thread)
        self.threads.append(thread)
        if self._sessions:
            event = thread.to_dict(guild.id, member_id=self.bot.id)
            event["newly_created"] = True
            await self._dispatch("THREAD_CREATE", event, guild_id=guild.id, intent=INTENT_GUILDS)
        self._notify()
        return thread.to_dict(guild.id, member_id=self.bot.id)

    async def _add_thread_member(self, call: _Call) -> _Reply:
        channel_id = call.param_id("channel_id")
        thread = self.channel(channel_id)
        guild = self.guild_of_channel(channel_id)
        if not isinstance(thread, GuildChannel) or not thread.is_thread or guild is None:
            raise _unknown_channel()
        user_id = self.bot.id if call.params["user_id"] == "@me" else call.param_id("user_id")
        member = guild.member(user_id)
        if member is None:
            raise _unknown_member()
        thread.member_ids.add(user_id)
        if self._sessions:
            added = _thread_member(thread.id, user_id)
            added["member"] = member.to_dict()
            added["presence"] = None
            event = {
                "id": str(thread.id),
                "guild_id": str(guild.id),
                "member_count": min(len(thread.member_ids), 50),
                "added_members": [added],
            }
            # Others joining are sent only with GUILD_MEMBERS ("Thread Members Update").
            intent = INTENT_GUILDS if user_id == self.bot.id else INTENT_GUILD_MEMBERS
            await self._dispatch("THREAD_MEMBERS_UPDATE", event, guild_id=guild.id, intent=intent)
        self._notify()
        return _Reply(204)

    # REST: application commands

    def _command_scope(self, call: _Call) -> int | None:
        if call.param_id("application_id") != self.application_id:
            # NOTE: the error for another application's id is a guess; the documentation
            # lists 20012 for acting on an application that is not yours.
            raise ApiError(
                403, 20012, "You are not authorized to perform this action on this application"
            )
        if "guild_id" not in call.params:
            return None
        guild_id = call.param_id("guild_id")
        if guild_id not in self.guilds:
            raise _unknown_guild()
        return guild_id

    async def _get_commands(self, call: _Call) -> _Reply:
        scope = self._command_scope(call)
        return _Reply(200, copy.deepcopy(self.commands.get(scope, [])))

    async def _overwrite_commands(self, call: _Call) -> _Reply:
        scope = self._command_scope(call)
        if not isinstance(call.body, list):
            raise invalid_form_body("_root", "BASE_TYPE_LIST", "Must be an array")
        _validate_commands(call.body)
        existing = {
            (command["name"], command["type"]): command for command in self.commands.get(scope, [])
        }
        stored = []
        for command in call.body:
            command_type = command.get("type", COMMAND_CHAT_INPUT)
            previous = existing.get((command["name"], command_type))
            stored.append(self._stored_command(command, command_type, scope, previous))
        self.commands[scope] = stored
        self._notify()
        return _Reply(200, copy.deepcopy(stored))

    def _stored_command(
        self,
        command: dict[str, Any],
        command_type: int,
        scope: int | None,
        previous: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Return the application command object Discord stores for one overwrite entry.

        An entry whose name and type match an existing command keeps its id.
        """
        stored: dict[str, Any] = {
            "id": previous["id"] if previous is not None else str(self._ids.next()),
            "application_id": str(self.application_id),
            "version": str(self._ids.next()),
            "type": command_type,
            "name": command["name"],
            "name_localizations": command.get("name_localizations"),
            "description": command.get("description", ""),
            "description_localizations": command.get("description_localizations"),
            "default_member_permissions": command.get("default_member_permissions"),
            "dm_permission": command.get("dm_permission", True),
            "nsfw": command.get("nsfw", False),
            "integration_types": command.get("integration_types") or [0],
            "contexts": command.get("contexts"),
        }
        if command.get("options"):
            stored["options"] = command["options"]
        if scope is not None:
            stored["guild_id"] = str(scope)
        return stored

    # REST: interaction responses

    def _interaction_by_token(self, call: _Call) -> InteractionRecord:
        """Find the interaction of a webhook route and check that its token is still valid."""
        if call.param_id("application_id") != self.application_id:
            raise _unknown_webhook()
        token = call.params["interaction_token"]
        record = next((item for item in self.interactions.values() if item.token == token), None)
        if record is None:
            raise _unknown_webhook()
        if asyncio.get_running_loop().time() - record.sent_at > self.interaction_token_lifetime:
            raise ApiError(401, 50027, "Invalid Webhook Token")
        return record

    def _record_response(
        self,
        interaction_id: int,
        kind: str,
        *,
        callback_type: int | None = None,
        data: dict[str, Any] | None = None,
        status: int,
        error: ApiError | None = None,
        message_id: int | None = None,
    ) -> None:
        self.interaction_responses.append(
            InteractionResponse(
                interaction_id=interaction_id,
                kind=kind,
                callback_type=callback_type,
                data=copy.deepcopy(data),
                status=status,
                error_code=error.code if error is not None else None,
                message_id=message_id,
            )
        )
        self._notify()

    async def _interaction_callback(self, call: _Call) -> _Reply:
        body = call.json_object()
        callback_type = body.get("type")
        data = body.get("data")
        interaction_id = call.param_id("interaction_id")
        try:
            record = self._check_callback(call, interaction_id, callback_type)
            reply = await self._accept_callback(call, record, callback_type, data)
        except ApiError as error:
            self._record_response(
                interaction_id,
                "callback",
                callback_type=callback_type,
                data=data,
                status=error.status,
                error=error,
            )
            raise
        self._record_response(
            interaction_id,
            "callback",
            callback_type=callback_type,
            data=data,
            status=reply.status,
            message_id=record.original_message_id,
        )
        return reply

    def _check_callback(
        self, call: _Call, interaction_id: int, callback_type: Any
    ) -> InteractionRecord:
        record = self.interactions.get(interaction_id)
        if record is None or record.token != call.params["interaction_token"]:
            raise _unknown_interaction()
        if record.acknowledged:
            raise _already_acknowledged()
        if asyncio.get_running_loop().time() - record.sent_at > self.interaction_response_deadline:
            # The initial response must come within 3 s; then the token is invalid.
            raise _unknown_interaction()
        if callback_type not in COMMAND_CALLBACK_TYPES:
            # NOTE: the error wording is not from the documentation, which only lists
            # the callback types each interaction type accepts.
            raise invalid_form_body(
                "type",
                "INTERACTION_CALLBACK_TYPE_INVALID",
                "Callback type not valid for an application command",
            )
        return record

    async def _accept_callback(
        self, call: _Call, record: InteractionRecord, callback_type: int, data: Any
    ) -> _Reply:
        data = data if isinstance(data, dict) else {}
        guild = self.guilds.get(record.guild_id) if record.guild_id is not None else None
        message: dict[str, Any] | None = None
        if callback_type == CALLBACK_CHANNEL_MESSAGE_WITH_SOURCE:
            sent = await self._create_bot_message(
                record.channel_id,
                guild,
                data,
                call.files,
                source="interaction_response",
                default_parse=("users",),
                field_prefix="data.",
                interaction=record,
                message_type=_interaction_message_type(record),
            )
            record.original_message_id = sent.id
            message = self._messages[sent.id]
        elif callback_type == CALLBACK_DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE:
            # A deferred response shows a loading message until it is edited.
            sent = await self._create_bot_message(
                record.channel_id,
                guild,
                {"flags": int(data.get("flags") or 0) & MESSAGE_FLAG_EPHEMERAL},
                [],
                source="interaction_response",
                default_parse=("users",),
                interaction=record,
                message_type=_interaction_message_type(record),
                forced_flags=MESSAGE_FLAG_LOADING,
                allow_empty=True,
            )
            record.original_message_id = sent.id
        record.response_type = callback_type

        # Without with_response the callback has no body.
        if call.query.get("with_response") not in ("1", "true", "True"):
            return _Reply(204)
        original = self._messages.get(record.original_message_id or 0)
        interaction_part: dict[str, Any] = {
            "id": str(record.id),
            "type": INTERACTION_APPLICATION_COMMAND,
        }
        if original is not None:
            interaction_part.update(
                {
                    "response_message_id": original["id"],
                    "response_message_loading": bool(original["flags"] & MESSAGE_FLAG_LOADING),
                    "response_message_ephemeral": bool(original["flags"] & MESSAGE_FLAG_EPHEMERAL),
                }
            )
        resource: dict[str, Any] = {"type": callback_type}
        if message is not None:
            resource["message"] = message
        return _Reply(200, {"interaction": interaction_part, "resource": resource})

    async def _create_followup(self, call: _Call) -> _Reply:
        body = call.json_object()
        try:
            record = self._interaction_by_token(call)
            if not record.acknowledged:
                # NOTE: the documentation does not say how Discord treats a followup sent
                # before the initial response; the stand-in rejects it with Unknown Webhook.
                raise _unknown_webhook()
            original = self._messages.get(record.original_message_id or 0)
            if original is not None and original["flags"] & MESSAGE_FLAG_LOADING:
                # Right after a deferred response a followup edits the loading message
                # ("Create Followup Message"); the ephemeral flag stays as deferred.
                await self._apply_edit(
                    original, body, call.files, field_prefix="", finishes_loading=True
                )
                message = original
            else:
                guild = self.guilds.get(record.guild_id) if record.guild_id is not None else None
                sent = await self._create_bot_message(
                    record.channel_id,
                    guild,
                    body,
                    call.files,
                    source="followup",
                    default_parse=("users",),
                    interaction=record,
                    message_type=_interaction_message_type(record),
                )
                record.followup_message_ids.append(sent.id)
                message = self._messages[sent.id]
        except ApiError as error:
            self._record_webhook_error(call, "followup", body, error)
            raise
        self._record_response(
            record.id, "followup", data=body, status=200, message_id=int(message["id"])
        )
        # Followups always return the message: wait is always true for them.
        return _Reply(200, message)

    def _record_webhook_error(self, call: _Call, kind: str, body: Any, error: ApiError) -> None:
        token = call.params.get("interaction_token")
        record = next((item for item in self.interactions.values() if item.token == token), None)
        if record is not None:
            self._record_response(
                record.id,
                kind,
                data=body if isinstance(body, dict) else None,
                status=error.status,
                error=error,
            )

    def _original_message(self, record: InteractionRecord) -> dict[str, Any]:
        message = self._messages.get(record.original_message_id or 0)
        if message is None:
            raise _unknown_message()
        return message

    async def _get_original(self, call: _Call) -> _Reply:
        try:
            record = self._interaction_by_token(call)
            message = self._original_message(record)
        except ApiError as error:
            self._record_webhook_error(call, "get_original", None, error)
            raise
        self._record_response(record.id, "get_original", status=200, message_id=int(message["id"]))
        return _Reply(200, message)

    async def _edit_original(self, call: _Call) -> _Reply:
        body = call.json_object()
        try:
            record = self._interaction_by_token(call)
            message = self._original_message(record)
            await self._apply_edit(
                message, body, call.files, field_prefix="", finishes_loading=True
            )
        except ApiError as error:
            self._record_webhook_error(call, "edit_original", body, error)
            raise
        self._record_response(
            record.id, "edit_original", data=body, status=200, message_id=int(message["id"])
        )
        return _Reply(200, message)

    async def _delete_original(self, call: _Call) -> _Reply:
        try:
            record = self._interaction_by_token(call)
            message = self._original_message(record)
            await self._delete_stored(message)
        except ApiError as error:
            self._record_webhook_error(call, "delete_original", None, error)
            raise
        self._record_response(
            record.id, "delete_original", status=204, message_id=int(message["id"])
        )
        return _Reply(204)

    async def _edit_followup(self, call: _Call) -> _Reply:
        body = call.json_object()
        try:
            record = self._interaction_by_token(call)
            message_id = call.param_id("message_id")
            if (
                message_id not in record.followup_message_ids
                and message_id != record.original_message_id
            ):
                raise _unknown_message()
            message = self._messages.get(message_id)
            if message is None:
                raise _unknown_message()
            await self._apply_edit(message, body, call.files, field_prefix="")
        except ApiError as error:
            self._record_webhook_error(call, "edit_followup", body, error)
            raise
        self._record_response(
            record.id, "edit_followup", data=body, status=200, message_id=message_id
        )
        return _Reply(200, message)


# Request and response helpers


async def _read_body(request: web.Request) -> tuple[Any, list[tuple[str, str, bytes, str | None]]]:
    """Return the JSON body (from ``payload_json`` for multipart forms) and uploaded files."""
    if not request.can_read_body:
        return None, []
    if request.content_type == "multipart/form-data":
        body: Any = None
        files: list[tuple[str, str, bytes, str | None]] = []
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "payload_json":
                body = _parse_json(await part.read())
            elif part.name is not None and part.name.startswith("files["):
                content = bytes(await part.read())
                files.append(
                    (part.name, part.filename or "file", content, part.headers.get("Content-Type"))
                )
        return body, files
    raw = await request.read()
    if not raw:
        return None, []
    return _parse_json(raw), []


def _parse_json(raw: bytes | bytearray) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _invalid_json() from None


def _json_response(status: int, body: Any) -> web.Response:
    if status == 204 or body is None:
        return web.Response(status=status)
    # Exactly "application/json", as Discord sends it: discord.py parses JSON only when the
    # Content-Type header equals that string, and a charset parameter would break it.
    response = web.Response(status=status, body=json.dumps(body).encode())
    response.headers["Content-Type"] = "application/json"
    return response


def _rate_limit_headers(bucket: str) -> dict[str, str]:
    """Rate-limit headers of an unexhausted bucket, so that discord.py never waits on them."""
    return {
        "X-RateLimit-Limit": "50",
        "X-RateLimit-Remaining": "49",
        "X-RateLimit-Reset": f"{time.time() + 1:.3f}",
        "X-RateLimit-Reset-After": "1.000",
        "X-RateLimit-Bucket": bucket,
    }


def _interaction_message_type(record: InteractionRecord) -> int:
    # NOTE: the type of interaction response messages is not in the documentation's
    # tables; these are the types Discord clients show for command replies.
    return (
        MESSAGE_CHAT_INPUT_COMMAND
        if record.command_type == COMMAND_CHAT_INPUT
        else MESSAGE_CONTEXT_MENU_COMMAND
    )


def _option_type_of(value: Any) -> int:
    if isinstance(value, bool):
        return OPTION_BOOLEAN
    if isinstance(value, int):
        return OPTION_INTEGER
    if isinstance(value, float):
        return OPTION_NUMBER
    if isinstance(value, DiscordUser):
        return OPTION_USER
    if isinstance(value, GuildChannel):
        return OPTION_CHANNEL
    if isinstance(value, GuildRole):
        return OPTION_ROLE
    return OPTION_STRING


def _option_value(value: Any) -> Any:
    if isinstance(value, (DiscordUser, GuildChannel, GuildRole)):
        return str(value.id)
    return value


def _validate_message_body(
    body: dict[str, Any], *, has_files: bool, field_prefix: str, allow_empty: bool = False
) -> None:
    """Check a message body as Create Message does: length, embeds, allowed_mentions, emptiness."""
    content = body.get("content")
    if content is not None and len(str(content)) > MAX_MESSAGE_CONTENT_LENGTH:
        # NOTE: lengths are counted in Unicode code points here; the documentation
        # gives the 2000 limit without saying how characters are counted.
        raise _content_too_long(f"{field_prefix}content")
    embeds = body.get("embeds") or []
    if len(embeds) > MAX_EMBEDS:
        raise invalid_form_body(
            f"{field_prefix}embeds",
            "BASE_TYPE_MAX_LENGTH",
            f"Must be {MAX_EMBEDS} or fewer in length.",
        )
    _validate_allowed_mentions(body.get("allowed_mentions"), f"{field_prefix}allowed_mentions")
    has_payload = (
        bool(content)
        or bool(embeds)
        or bool(body.get("components"))
        or bool(body.get("sticker_ids"))
    )
    if not (allow_empty or has_payload or has_files or body.get("poll")):
        raise _empty_message()


def _validate_allowed_mentions(allowed: Any, field_path: str) -> None:
    if allowed is None:
        return
    if not isinstance(allowed, dict):
        raise invalid_form_body(
            field_path, "MODEL_TYPE_CONVERT", "Only dictionaries may be used in a ModelType"
        )
    parse = allowed.get("parse") or []
    for kind in ("users", "roles"):
        listed = allowed.get(kind) or []
        if kind in parse and listed:
            # Both parse and the id list for the same type is a documented validation error.
            raise invalid_form_body(
                f"{field_path}.parse",
                "ALLOWED_MENTIONS_PARSE_EXCLUSIVE",
                f'parse:["{kind}"] and {kind}: [ids...] are mutually exclusive.',
            )
        if len(listed) > MAX_ALLOWED_MENTION_IDS:
            raise invalid_form_body(
                f"{field_path}.{kind}",
                "BASE_TYPE_MAX_LENGTH",
                f"Must be {MAX_ALLOWED_MENTION_IDS} or fewer in length.",
            )
    unknown = set(parse) - {"users", "roles", "everyone"}
    if unknown:
        raise invalid_form_body(
            f"{field_path}.parse",
            "BASE_TYPE_CHOICES",
            "Value must be one of ('roles', 'users', 'everyone').",
        )


def _validate_commands(commands: list[Any]) -> None:
    """Check a bulk overwrite body against the documented naming rules and limits."""
    counts: dict[int, int] = {}
    seen: set[tuple[str, int]] = set()
    for index, command in enumerate(commands):
        path = str(index)
        if not isinstance(command, dict):
            raise invalid_form_body(
                path, "MODEL_TYPE_CONVERT", "Only dictionaries may be used in a ModelType"
            )
        command_type = command.get("type", COMMAND_CHAT_INPUT)
        if command_type not in MAX_COMMANDS:
            raise invalid_form_body(
                f"{path}.type", "BASE_TYPE_CHOICES", f"Value must be one of {sorted(MAX_COMMANDS)}."
            )
        name = command.get("name")
        _validate_command_name(name, command_type, f"{path}.name")
        if (name, command_type) in seen:
            raise invalid_form_body(
                path,
                "APPLICATION_COMMANDS_DUPLICATE_NAME",
                "Application command names must be unique",
            )
        seen.add((name, command_type))
        counts[command_type] = counts.get(command_type, 0) + 1
        if counts[command_type] > MAX_COMMANDS[command_type]:
            raise ApiError(400, 30032, "Maximum number of application commands reached")
        description = command.get("description", "")
        if command_type == COMMAND_CHAT_INPUT:
            _validate_description(description, f"{path}.description")
        elif description:
            # User and message commands take an empty description.
            raise invalid_form_body(
                f"{path}.description", "BASE_TYPE_BAD_LENGTH", "Must be 0 or fewer in length."
            )
        _validate_localizations(command, command_type, path)
        options = command.get("options") or []
        if options and command_type != COMMAND_CHAT_INPUT:
            raise invalid_form_body(
                f"{path}.options", "BASE_TYPE_MAX_LENGTH", "Must be 0 or fewer in length."
            )
        _validate_options(options, f"{path}.options")


def _validate_options(options: list[Any], path: str) -> None:
    if len(options) > MAX_COMMAND_OPTIONS:
        raise invalid_form_body(
            path, "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_COMMAND_OPTIONS} or fewer in length."
        )
    names: set[str] = set()
    seen_optional = False
    for index, option in enumerate(options):
        option_path = f"{path}.{index}"
        if not isinstance(option, dict) or option.get("type") not in range(
            OPTION_SUB_COMMAND, OPTION_ATTACHMENT + 1
        ):
            raise invalid_form_body(
                f"{option_path}.type",
                "BASE_TYPE_CHOICES",
                "Value must be an option type from 1 to 11.",
            )
        _validate_command_name(option.get("name"), COMMAND_CHAT_INPUT, f"{option_path}.name")
        if option["name"] in names:
            raise invalid_form_body(
                option_path,
                "APPLICATION_COMMAND_OPTIONS_NAME_ALREADY_EXISTS",
                "Option names must be unique",
            )
        names.add(option["name"])
        _validate_description(option.get("description"), f"{option_path}.description")
        _validate_localizations(option, COMMAND_CHAT_INPUT, option_path)
        if option.get("required"):
            if seen_optional:
                # Required options must come before optional ones.
                raise invalid_form_body(
                    option_path,
                    "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                    "Required options must be placed before non-required options",
                )
        else:
            seen_optional = True
        if option["type"] in (OPTION_SUB_COMMAND, OPTION_SUB_COMMAND_GROUP):
            _validate_options(option.get("options") or [], f"{option_path}.options")


def _validate_command_name(name: Any, command_type: int, path: str) -> None:
    if not isinstance(name, str) or not 1 <= len(name) <= 32:
        raise invalid_form_body(path, "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 32 in length.")
    if command_type == COMMAND_CHAT_INPUT and (
        not _CHAT_INPUT_NAME.match(name) or name != name.lower()
    ):
        raise invalid_form_body(path, "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")


def _validate_description(description: Any, path: str) -> None:
    if not isinstance(description, str) or not 1 <= len(description) <= 100:
        raise invalid_form_body(
            path, "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
        )


def _validate_localizations(item: dict[str, Any], command_type: int, path: str) -> None:
    for key, check in (
        ("name_localizations", "name"),
        ("description_localizations", "description"),
    ):
        localizations = item.get(key)
        if localizations is None:
            continue
        if not isinstance(localizations, dict):
            raise invalid_form_body(
                f"{path}.{key}", "DICT_TYPE_CONVERT", "Only dictionaries may be used in a DictType"
            )
        for locale, text in localizations.items():
            if locale not in LOCALES:
                raise invalid_form_body(
                    f"{path}.{key}.{locale}", "LOCALE_INVALID", f"Invalid locale {locale!r}"
                )
            if check == "name":
                _validate_command_name(text, command_type, f"{path}.{key}.{locale}")
            elif command_type == COMMAND_CHAT_INPUT:
                _validate_description(text, f"{path}.{key}.{locale}")


# Pointing discord.py at the stand-in


@contextlib.contextmanager
def redirect_discord_py(server: DiscordStandin) -> Iterator[None]:
    """Point discord.py's REST base and default gateway at ``server``; restore them on exit.

    Close every client before leaving the block: a client that reconnects after
    it ends would go to Discord's real gateway.
    """
    previous_base = Route.BASE
    previous_gateway = DiscordWebSocket.DEFAULT_GATEWAY
    Route.BASE = server.api_base
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(server.gateway_url)
    try:
        yield
    finally:
        Route.BASE = previous_base
        DiscordWebSocket.DEFAULT_GATEWAY = previous_gateway
