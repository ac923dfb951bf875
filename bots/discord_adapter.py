"""The Discord adapter: discord.py events and slash commands in, ConversationManager replies out.

Direct messages are always answered; in servers the bot answers when it is
mentioned, in configured support channels, and in the private thread that
/talk opens. A person's history is keyed by platform and user only, so it
follows them between direct messages, threads and servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec

import discord
import yarl
from discord import app_commands

from bots.lifecycle import AdapterState, InFlight, tell_reply_cut
from bots.rendering import MarkdownFlavor, split_message
from core import i18n
from core.config import DiscordSettings
from core.locks import KeyedLocks
from core.manager import ConversationManager, IncomingMessage, Reply, ReplyKind
from core.safety.desk import Actor, Delivery

_LOGGER = logging.getLogger(__name__)

PLATFORM = "discord"
MESSAGE_LIMIT = 2000
# One conversation per person on Discord, whatever the server or channel.
CHAT_ID = "discord"

_PORTAL_HINT = (
    "Open https://discord.com/developers/applications, choose this bot's application, "
    "go to Bot > Privileged Gateway Intents, turn on MESSAGE CONTENT INTENT and save; "
    "then start MindHarbor again."
)


class MessageContentIntentMissing(RuntimeError):
    """The application may not read message content, so every message would look empty."""


# Command descriptions per locale, as Discord shows them in the command picker.
_DESCRIPTIONS = {
    "talk": ("Talk privately with MindHarbor", "与 MindHarbor 私下聊聊"),
    "reset": ("Start a new conversation", "开始新的对话"),
    "lang": ("Choose the language MindHarbor replies in", "选择 MindHarbor 回复的语言"),
    "forget": (
        "Delete everything MindHarbor stored about you",
        "删除 MindHarbor 保存的关于你的全部内容",
    ),
    "help": ("How to use MindHarbor", "MindHarbor 使用说明"),
    "privacy": (
        "What is stored, for how long, and your choices",
        "保存哪些内容、保存多久以及你的选择",
    ),
    "agree": ("Let MindHarbor store our conversation", "同意 MindHarbor 保存我们的对话"),
    "withdraw": ("Stop storing my messages", "停止保存我的消息"),
    "optin": ("Allow anonymised use for training", "同意匿名用于训练"),
    "optout": ("Stop use for training", "停止用于训练"),
    "talk.message": ("What you would like to say (optional)", "你想说的话（可选）"),
    "lang.language": ("zh or en", "zh 或 en"),
    "case": ("Safety cases (moderators only)", "安全个案（仅限管理员）"),
    "case.list": ("List open safety cases", "列出未结束的安全个案"),
    "case.ack": ("Acknowledge a case", "确认个案"),
    "case.handoff": ("Take over a case: the model stops answering", "转人工：模型停止回复"),
    "case.reply": ("Answer the user of a case through the bot", "通过机器人回复个案用户"),
    "case.resolve": ("Close a case; the model answers again", "结案；模型恢复回复"),
    "case.escalate": ("Raise a case to crisis and post it again", "将个案升级为危机并再次通知"),
    "case.case_id": ("Case number", "个案编号"),
    "case.message": ("What to send to the user", "要发给用户的内容"),
    "case.note": ("A note for the case record", "个案记录的说明"),
}


class _Translator(app_commands.Translator):
    async def translate(
        self,
        string: app_commands.locale_str,
        locale: discord.Locale,
        context: app_commands.TranslationContextTypes,
    ) -> str | None:
        key = string.extras.get("key")
        if key not in _DESCRIPTIONS or locale is not discord.Locale.chinese:
            return None
        return _DESCRIPTIONS[key][1]


def _described(key: str) -> app_commands.locale_str:
    return app_commands.locale_str(_DESCRIPTIONS[key][0], key=key)


_Params = ParamSpec("_Params")


def _tracked(
    handler: Callable[Concatenate[DiscordAdapter, _Params], Awaitable[None]],
) -> Callable[Concatenate[DiscordAdapter, _Params], Awaitable[None]]:
    """Count a running event or command handler as in flight, so that shutdown waits for it."""

    @functools.wraps(handler)
    async def wrapper(
        adapter: DiscordAdapter, *args: _Params.args, **kwargs: _Params.kwargs
    ) -> None:
        with adapter._in_flight.track():
            await handler(adapter, *args, **kwargs)

    return wrapper


class DiscordAdapter:
    """Run one Discord bot against the conversation manager."""

    def __init__(
        self, *, manager: ConversationManager | None, settings: DiscordSettings, token: str
    ) -> None:
        # ``manager`` may be None only for login_and_sync(), which answers nothing.
        self._manager: ConversationManager = manager  # type: ignore[assignment]
        self._settings = settings
        self._token = token
        self._order = KeyedLocks()
        self._in_flight = InFlight()
        self._client: discord.Client | None = None
        self._tree: app_commands.CommandTree | None = None
        self._gateway: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        # True from on_ready or on_resumed until on_disconnect.
        self._connected = False
        self.state = AdapterState.CREATED

    # Lifecycle

    async def __aenter__(self) -> DiscordAdapter:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def client(self) -> discord.Client:
        if self._client is None:
            raise RuntimeError("The Discord adapter is not running; call start() first.")
        return self._client

    async def _login(self) -> discord.Client:
        # discord.py keeps both addresses as class attributes, so they apply process-wide.
        if self._settings.api_base_url:
            discord.http.Route.BASE = self._settings.api_base_url.rstrip("/")
        if self._settings.gateway_url:
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self._settings.gateway_url)

        intents = discord.Intents.none()
        intents.guilds = True
        intents.guild_messages = True
        intents.dm_messages = True
        intents.message_content = True
        shard: dict[str, int] = {}
        if self._settings.shard_count is not None and self._settings.shard_id is not None:
            shard = {"shard_id": self._settings.shard_id, "shard_count": self._settings.shard_count}
        client = discord.Client(
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
            guild_ready_timeout=self._settings.guild_ready_timeout_s,
            **shard,
        )
        self._client = client
        self._tree = app_commands.CommandTree(client)
        self._register_events(client)
        self._register_commands(self._tree)
        await self._tree.set_translator(_Translator())
        # Logging in fetches the application, whose flags say whether content may be read.
        await client.login(self._token)
        return client

    async def login_and_sync(self) -> list[str]:
        """Register the slash commands without connecting to the gateway, then log out."""
        client = await self._login()
        try:
            return await self.sync_commands()
        finally:
            await client.close()

    async def start(self) -> None:
        if self.state is AdapterState.RUNNING:
            _LOGGER.debug("Discord adapter already running")
            return
        client = await self._login()
        self._check_message_content_flag(client)
        if self._settings.sync_commands_on_start:
            await self.sync_commands()

        self._ready.clear()
        self._gateway = asyncio.create_task(client.connect(reconnect=True), name="Discord:gateway")
        ready = asyncio.create_task(self._ready.wait(), name="Discord:ready")
        done, _ = await asyncio.wait({self._gateway, ready}, return_when=asyncio.FIRST_COMPLETED)
        if self._gateway in done:
            ready.cancel()
            error = self._gateway.exception()
            await client.close()
            if isinstance(error, discord.PrivilegedIntentsRequired):
                raise MessageContentIntentMissing(
                    "Discord refused the connection because the bot asks for the message "
                    f"content intent, which is not enabled for it. {_PORTAL_HINT}"
                ) from error
            raise RuntimeError("The Discord gateway closed before the bot was ready") from error
        self.state = AdapterState.RUNNING
        if self._manager.safety is not None:
            self._manager.safety.desk.register_link(self)
        _LOGGER.info("Discord adapter connected as %s", client.user)

    async def stop_intake(self) -> None:
        """Stop reading gateway events, so no new message or command arrives.

        Handlers already running go on, and stop() closes the connection later.
        Discord does not send the events of this pause again, so the messages
        that users send until the next process connects get no reply.
        """
        if self.state is not AdapterState.RUNNING:
            return
        if self._gateway is not None and not self._gateway.done():
            self._gateway.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gateway
        # Handlers of the events read last are scheduled but may not have started.
        await asyncio.sleep(0)
        _LOGGER.info("Discord adapter stopped reading gateway events")

    async def drain(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for running handlers; cancel the rest and return how many."""
        return await self._in_flight.finish(timeout_s)

    async def stop(self) -> None:
        if self.state is not AdapterState.RUNNING:
            return
        self.state = AdapterState.STOPPED
        if self._manager.safety is not None:
            self._manager.safety.desk.unregister_link(PLATFORM)
        await self.client.close()
        if self._gateway is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._gateway
        _LOGGER.info("Discord adapter stopped")

    def is_connected(self) -> bool:
        """Return True while the gateway connection is up (read by the health check)."""
        gateway = self._gateway
        return (
            self.state is AdapterState.RUNNING
            and self._connected
            and gateway is not None
            and not gateway.done()
        )

    async def sync_commands(self) -> list[str]:
        """Register the slash commands with Discord (globally or in the configured guilds)."""
        assert self._tree is not None
        names: list[str] = []
        if self._settings.command_guild_ids:
            for guild_id in self._settings.command_guild_ids:
                guild = discord.Object(id=guild_id)
                self._tree.copy_global_to(guild=guild)
                names = [command.name for command in await self._tree.sync(guild=guild)]
        else:
            names = [command.name for command in await self._tree.sync()]
        _LOGGER.info("Registered Discord commands: %s", ", ".join(names))
        return names

    def _check_message_content_flag(self, client: discord.Client) -> None:
        if client.application is None:
            return
        flags = client.application.flags
        if not (flags.gateway_message_content or flags.gateway_message_content_limited):
            raise MessageContentIntentMissing(
                "This Discord application may not read message content, so every message "
                f"would reach MindHarbor empty. {_PORTAL_HINT}"
            )

    # Events

    def _register_events(self, client: discord.Client) -> None:
        @client.event
        async def on_ready() -> None:
            self._connected = True
            self._ready.set()

        # discord.py reconnects on its own: a resumed session is connected again, and
        # a new one calls on_ready again.
        @client.event
        async def on_resumed() -> None:
            self._connected = True

        @client.event
        async def on_disconnect() -> None:
            self._connected = False

        @client.event
        async def on_message(message: discord.Message) -> None:
            await self._on_message(message)

        @client.event
        async def on_message_edit(before: discord.Message, after: discord.Message) -> None:
            await self._on_message_edit(after)

    def _is_addressed(self, message: discord.Message) -> bool:
        if message.guild is None:
            return True
        me = self.client.user
        channel = message.channel
        if isinstance(channel, discord.Thread) and me is not None and channel.owner_id == me.id:
            return True
        if channel.id == self._settings.moderator_channel_id:
            # Moderators talk among themselves there; the bot only takes commands.
            return False
        if channel.id in self._settings.support_channel_ids:
            return True
        return me is not None and me in message.mentions

    def _clean_text(self, message: discord.Message) -> str:
        me = self.client.user
        text = message.content
        if me is not None:
            text = re.sub(rf"<@!?{me.id}>", " ", text)
        return " ".join(text.split(" ")).strip()

    @_tracked
    async def _on_message(self, message: discord.Message) -> None:
        # The bot itself and every other bot are ignored, attachments or not.
        if message.author.bot or not self._is_addressed(message):
            return
        async with self._order.hold(message.author.id):
            text = self._clean_text(message)
            if not text:
                if message.attachments or message.stickers or message.embeds:
                    locale = await self._manager.user_locale(self._incoming(message.author, ""))
                    await self._send(message.channel, i18n.text("text_only", locale))
                return
            incoming = self._incoming(message.author, text, message_id=str(message.id))
            reply = await self._answer_with_typing(message.channel, incoming)
            if reply.kind is ReplyKind.CONSENT_REQUIRED:
                view = _ConsentView(self._manager, incoming, reply.locale)
                await message.channel.send(
                    reply.text, view=view, allowed_mentions=discord.AllowedMentions.none()
                )
                return
            if reply.should_send:
                await self._send(message.channel, reply.text)

    @_tracked
    async def _on_message_edit(self, message: discord.Message) -> None:
        if message.author.bot or not self._is_addressed(message):
            return
        edited_at = message.edited_at
        text = self._clean_text(message)
        if edited_at is None or not text:
            return
        async with self._order.hold(message.author.id):
            incoming = self._incoming(
                message.author,
                text,
                message_id=str(message.id),
                revision=int(edited_at.timestamp() * 1000),
            )
            await self._manager.handle_edit(incoming)

    # Slash commands

    def _register_commands(self, tree: app_commands.CommandTree) -> None:
        adapter = self

        @tree.command(name="talk", description=_described("talk"))
        @app_commands.describe(message=_described("talk.message"))
        async def talk(interaction: discord.Interaction, message: str | None = None) -> None:
            await adapter._on_talk(interaction, message)

        @tree.command(name="reset", description=_described("reset"))
        async def reset(interaction: discord.Interaction) -> None:
            await adapter._on_simple_command(interaction, "reset")

        @tree.command(name="lang", description=_described("lang"))
        @app_commands.describe(language=_described("lang.language"))
        @app_commands.choices(
            language=[
                app_commands.Choice(name="中文", value="zh"),
                app_commands.Choice(name="English", value="en"),
            ]
        )
        async def lang(interaction: discord.Interaction, language: str) -> None:
            await adapter._on_simple_command(interaction, "lang", language)

        @tree.command(name="forget", description=_described("forget"))
        async def forget(interaction: discord.Interaction) -> None:
            await adapter._on_forget(interaction)

        @tree.command(name="help", description=_described("help"))
        async def help_command(interaction: discord.Interaction) -> None:
            await adapter._on_simple_command(interaction, "help")

        for name in ("privacy", "agree", "withdraw", "optin", "optout"):
            tree.add_command(
                app_commands.Command(
                    name=name,
                    description=_described(name),
                    callback=adapter._privacy_command(name),
                )
            )

        self._register_moderator_commands(tree)

    def _register_moderator_commands(self, tree: app_commands.CommandTree) -> None:
        adapter = self
        # Hidden from members without Manage Messages by default. The role check
        # below decides in any case, whatever a server's command permissions are.
        case = app_commands.Group(
            name="case",
            description=_described("case"),
            default_permissions=discord.Permissions(manage_messages=True),
            guild_only=True,
        )

        @case.command(name="list", description=_described("case.list"))
        async def case_list(interaction: discord.Interaction) -> None:
            await adapter._on_case(interaction, "list")

        @case.command(name="ack", description=_described("case.ack"))
        @app_commands.describe(case_id=_described("case.case_id"))
        async def case_ack(interaction: discord.Interaction, case_id: int) -> None:
            await adapter._on_case(interaction, "ack", case_id)

        @case.command(name="handoff", description=_described("case.handoff"))
        @app_commands.describe(case_id=_described("case.case_id"))
        async def case_handoff(interaction: discord.Interaction, case_id: int) -> None:
            await adapter._on_case(interaction, "handoff", case_id)

        @case.command(name="reply", description=_described("case.reply"))
        @app_commands.describe(
            case_id=_described("case.case_id"), message=_described("case.message")
        )
        async def case_reply(interaction: discord.Interaction, case_id: int, message: str) -> None:
            await adapter._on_case(interaction, "reply", case_id, message)

        @case.command(name="resolve", description=_described("case.resolve"))
        @app_commands.describe(case_id=_described("case.case_id"), note=_described("case.note"))
        async def case_resolve(interaction: discord.Interaction, case_id: int, note: str) -> None:
            await adapter._on_case(interaction, "resolve", case_id, note)

        @case.command(name="escalate", description=_described("case.escalate"))
        @app_commands.describe(case_id=_described("case.case_id"), note=_described("case.note"))
        async def case_escalate(
            interaction: discord.Interaction, case_id: int, note: str = ""
        ) -> None:
            await adapter._on_case(interaction, "escalate", case_id, note)

        tree.add_command(case)

        @tree.context_menu(name="Escalate to moderators")
        @app_commands.default_permissions(manage_messages=True)
        @app_commands.guild_only()
        async def escalate_member(interaction: discord.Interaction, member: discord.Member) -> None:
            await adapter._on_escalate(interaction, member.id, None)

        @tree.context_menu(name="Escalate message")
        @app_commands.default_permissions(manage_messages=True)
        @app_commands.guild_only()
        async def escalate_message(
            interaction: discord.Interaction, message: discord.Message
        ) -> None:
            await adapter._on_escalate(interaction, message.author.id, message.content)

    def _privacy_command(self, name: str) -> Any:
        async def callback(interaction: discord.Interaction) -> None:
            await self._on_simple_command(interaction, name)

        return callback

    @_tracked
    async def _on_simple_command(
        self, interaction: discord.Interaction, name: str, argument: str = ""
    ) -> None:
        # Deferring first keeps a slow database from running past Discord's 3 s deadline.
        await interaction.response.defer(ephemeral=True, thinking=True)
        incoming = self._incoming(interaction.user, f"/{name}", locale=interaction.locale)
        async with self._order.hold(interaction.user.id):
            if name == "reset":
                reply = await self._manager.reset(incoming)
            elif name == "lang":
                reply = await self._manager.set_locale(incoming, argument)
            elif name == "privacy":
                reply = await self._manager.privacy_notice(incoming)
            elif name in ("agree", "withdraw"):
                reply = await self._manager.set_storage_consent(incoming, name == "agree")
            elif name in ("optin", "optout"):
                reply = await self._manager.set_training_consent(incoming, name == "optin")
            else:
                reply = await self._manager.notice(incoming, "discord_help")
        await interaction.followup.send(
            reply.text, ephemeral=True, allowed_mentions=discord.AllowedMentions.none()
        )

    @_tracked
    async def _on_talk(self, interaction: discord.Interaction, first_message: str | None) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        user = interaction.user
        incoming = self._incoming(user, "", locale=interaction.locale)
        locale = await self._manager.user_locale(incoming)

        place = await self._open_private_place(interaction)
        await self._send(place, i18n.text("talk_opened", locale, mention=user.mention))
        if interaction.guild is not None:
            await interaction.followup.send(
                i18n.text("talk_moved", locale, place=getattr(place, "mention", "")),
                ephemeral=True,
                allowed_mentions=discord.AllowedMentions.none(),
            )
        else:
            await interaction.followup.send(
                i18n.text("talk_here", locale),
                ephemeral=True,
                allowed_mentions=discord.AllowedMentions.none(),
            )

        if first_message and first_message.strip():
            async with self._order.hold(user.id):
                message = self._incoming(
                    user,
                    first_message,
                    message_id=f"interaction:{interaction.id}",
                    locale=interaction.locale,
                )
                reply = await self._answer_with_typing(place, message)
                if reply.should_send:
                    await self._send(place, reply.text)

    async def _open_private_place(self, interaction: discord.Interaction) -> Any:
        user = interaction.user
        channel = interaction.channel
        if interaction.guild is None or channel is None:
            return channel if channel is not None else await user.create_dm()
        if self._settings.talk_mode == "dm" or not isinstance(channel, discord.TextChannel):
            return await user.create_dm()

        thread = await channel.create_thread(
            name=f"MindHarbor · {user.display_name}"[:100],
            type=discord.ChannelType.private_thread,
            invitable=False,
            auto_archive_duration=1440,
        )
        await thread.add_user(user)
        return thread

    @_tracked
    async def _on_forget(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        incoming = self._incoming(interaction.user, "/forget", locale=interaction.locale)
        locale = await self._manager.user_locale(incoming)
        view = _ForgetView(self._manager, incoming, locale)
        await interaction.followup.send(
            i18n.text("forget_confirm", locale), view=view, ephemeral=True
        )

    # Moderators

    def _actor(self, interaction: discord.Interaction) -> Actor:
        roles = getattr(interaction.user, "roles", [])
        allowed = set(self._settings.moderator_role_ids)
        is_moderator = any(role.id in allowed for role in roles)
        return Actor(PLATFORM, str(interaction.user.id), is_moderator)

    @_tracked
    async def _on_case(
        self, interaction: discord.Interaction, action: str, case_id: int = 0, text: str = ""
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        safety = self._manager.safety
        if safety is None:
            return
        desk, actor = safety.desk, self._actor(interaction)
        if action == "list":
            answer = await desk.list_cases(actor)
        else:
            answer = await desk.act(actor, action, case_id, text)
        await self._followup(interaction, answer)

    @_tracked
    async def _on_escalate(
        self, interaction: discord.Interaction, user_id: int, excerpt: str | None
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        safety = self._manager.safety
        if safety is None:
            return
        # The target comes from Discord itself, so it exists even if it never wrote to the bot.
        answer = await safety.desk.escalate_user(
            self._actor(interaction), PLATFORM, str(user_id), excerpt=excerpt, known_to_exist=True
        )
        await self._followup(interaction, answer)

    async def _followup(self, interaction: discord.Interaction, text: str) -> None:
        for chunk in split_message(text, MESSAGE_LIMIT, markdown=MarkdownFlavor.DISCORD):
            await interaction.followup.send(
                chunk, ephemeral=True, allowed_mentions=discord.AllowedMentions.none()
            )

    # The desk's link to Discord

    platform = PLATFORM

    async def post_to_moderators(self, text: str) -> bool:
        """Post a case notice in the moderators' channel; False when none is configured."""
        channel_id = self._settings.moderator_channel_id
        if channel_id is None:
            return False
        channel = self.client.get_channel(channel_id) or await self.client.fetch_channel(channel_id)
        await self._send(channel, text)
        return True

    async def send_to_user(self, platform_user_id: str, text: str) -> Delivery:
        """Send to the user in a direct message."""
        try:
            user = self.client.get_user(int(platform_user_id)) or await self.client.fetch_user(
                int(platform_user_id)
            )
            channel = user.dm_channel or await user.create_dm()
            await self._send(channel, text)
        except (discord.Forbidden, discord.NotFound) as exc:
            # 50007: the user closed DMs from server members or blocked the bot.
            _LOGGER.warning("Cannot send a direct message to a Discord user: %s", exc)
            return Delivery.UNREACHABLE
        except discord.HTTPException as exc:
            _LOGGER.warning("Sending a direct message failed: %s", exc)
            return Delivery.FAILED
        return Delivery.SENT

    def command_hint(self, case_id: int) -> str:
        return (
            f"/case ack case_id:{case_id} · /case handoff case_id:{case_id} · "
            f"/case reply case_id:{case_id} · /case resolve case_id:{case_id}"
        )

    # Helpers

    def _incoming(
        self,
        user: discord.abc.User,
        text: str,
        *,
        message_id: str | None = None,
        revision: int = 0,
        locale: discord.Locale | None = None,
    ) -> IncomingMessage:
        return IncomingMessage(
            platform=PLATFORM,
            chat_id=CHAT_ID,
            user_id=str(user.id),
            text=text,
            locale_hint=str(locale) if locale is not None else None,
            message_id=message_id,
            revision=revision,
        )

    async def _answer_with_typing(self, channel: Any, incoming: IncomingMessage) -> Reply:
        """Generate the reply with a typing indicator; when streaming, show and return it sent."""
        typing = asyncio.create_task(self._keep_typing(channel), name="Discord:typing")
        streamer = None
        if self._settings.stream_edits:
            streamer = _EditStreamer(channel, self._settings.stream_edit_interval_s)
        try:
            reply = await self._manager.handle(
                incoming, on_delta=streamer.on_delta if streamer else None
            )
        except asyncio.CancelledError:
            if self._in_flight.cut:
                await tell_reply_cut(
                    self._manager, incoming, lambda text: self._send(channel, text)
                )
            raise
        finally:
            typing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await typing
        if streamer is not None:
            if await streamer.finish(reply.text if reply.should_send else ""):
                # The streamed messages already show the reply.
                reply.text = ""
        return reply

    async def _keep_typing(self, channel: Any) -> None:
        # Best effort: a failed typing indicator never delays the reply.
        while True:
            try:
                await channel.typing()
            except discord.HTTPException as exc:
                _LOGGER.debug("Typing indicator failed: %s", exc)
            await asyncio.sleep(self._settings.typing_interval_s)

    async def _send(self, channel: Any, text: str) -> None:
        """Send ``text`` in 2000-character chunks, in order, never pinging anyone."""
        for chunk in split_message(text, MESSAGE_LIMIT, markdown=MarkdownFlavor.DISCORD):
            await channel.send(chunk, allowed_mentions=discord.AllowedMentions.none())


class _EditStreamer:
    """Show a reply while it is generated by editing one message at most once per interval.

    The shown text stays within one message; the rest of a long reply is sent
    as further messages when the reply is complete.
    """

    def __init__(self, channel: Any, interval_s: float) -> None:
        self._channel = channel
        self._interval = interval_s
        self._text = ""
        self._message: discord.Message | None = None
        self._shown = ""
        self._last_edit = 0.0

    async def on_delta(self, delta: str) -> None:
        self._text += delta
        now = asyncio.get_running_loop().time()
        if now - self._last_edit < self._interval:
            return
        self._last_edit = now
        chunks = split_message(self._text, MESSAGE_LIMIT, markdown=MarkdownFlavor.DISCORD)
        if not chunks or chunks[0] == self._shown:
            return
        try:
            if self._message is None:
                self._message = await self._channel.send(
                    chunks[0], allowed_mentions=discord.AllowedMentions.none()
                )
            else:
                await self._message.edit(
                    content=chunks[0], allowed_mentions=discord.AllowedMentions.none()
                )
            self._shown = chunks[0]
        except discord.HTTPException as exc:
            _LOGGER.debug("Streaming edit failed: %s", exc)

    async def finish(self, final: str) -> bool:
        """Make the messages show ``final``; return False when nothing was streamed."""
        if self._message is None:
            return False
        chunks = split_message(final, MESSAGE_LIMIT, markdown=MarkdownFlavor.DISCORD)
        if not chunks:
            return True
        if chunks[0] != self._shown:
            await self._message.edit(
                content=chunks[0], allowed_mentions=discord.AllowedMentions.none()
            )
        for chunk in chunks[1:]:
            await self._channel.send(chunk, allowed_mentions=discord.AllowedMentions.none())
        return True


class _ForgetView(discord.ui.View):
    """The confirmation buttons of /forget."""

    def __init__(
        self, manager: ConversationManager, incoming: IncomingMessage, locale: str
    ) -> None:
        super().__init__(timeout=300)
        self._manager = manager
        self._incoming = incoming
        yes = discord.ui.Button(
            label=i18n.text("forget_yes", locale), style=discord.ButtonStyle.danger
        )
        no = discord.ui.Button(
            label=i18n.text("forget_no", locale), style=discord.ButtonStyle.secondary
        )
        yes.callback = self._confirm
        no.callback = self._cancel
        self.add_item(yes)
        self.add_item(no)

    async def _confirm(self, interaction: discord.Interaction) -> None:
        reply = await self._manager.forget(self._incoming)
        await interaction.response.edit_message(content=reply.text, view=None)
        self.stop()

    async def _cancel(self, interaction: discord.Interaction) -> None:
        reply = await self._manager.notice(self._incoming, "forget_cancelled")
        await interaction.response.edit_message(content=reply.text, view=None)
        self.stop()


class _ConsentView(discord.ui.View):
    """The "I agree" button under a request for consent to storage."""

    def __init__(
        self, manager: ConversationManager, incoming: IncomingMessage, locale: str
    ) -> None:
        super().__init__(timeout=3600)
        self._manager = manager
        self._incoming = incoming
        agree = discord.ui.Button(
            label=i18n.text("consent_button", locale), style=discord.ButtonStyle.primary
        )
        agree.callback = self._agree
        self.add_item(agree)

    async def _agree(self, interaction: discord.Interaction) -> None:
        reply = await self._manager.set_storage_consent(self._incoming, True)
        await interaction.response.edit_message(content=reply.text, view=None)
        self.stop()
