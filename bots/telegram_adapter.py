"""The Telegram adapter: python-telegram-bot updates in, ConversationManager replies out.

Long polling by default, webhook mode by configuration. One user's updates are
handled in order, and other users' at the same time. Replies are split at
Telegram's length limit and sent with retries on flood control and network
errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import logging
import secrets
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

from telegram import (
    BotCommand,
    BotCommandScopeChat,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    MessageEntity,
    ReplyParameters,
    Update,
)
from telegram.constants import ChatAction, ChatType, ParseMode
from telegram.error import (
    BadRequest,
    Conflict,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
    TimedOut,
)
from telegram.ext import (
    Application,
    ApplicationBuilder,
    ApplicationHandlerStop,
    BaseUpdateProcessor,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    TypeHandler,
    filters,
)
from telegram.request import HTTPXRequest
from telegram.warnings import PTBDeprecationWarning

from bots.lifecycle import AdapterState, InFlight, tell_reply_cut
from bots.rendering import MarkdownFlavor, split_message, to_markdown_v2
from core import i18n
from core.config import TelegramSettings
from core.errors import PlatformUnavailable
from core.locks import KeyedLocks
from core.manager import ConversationManager, IncomingMessage, Reply, ReplyKind
from core.safety.desk import CASE_ACTIONS, Actor, Delivery, SafetyDesk

_LOGGER = logging.getLogger(__name__)

PLATFORM = "telegram"
MESSAGE_LIMIT = 4096
COMMANDS = (
    "start",
    "help",
    "reset",
    "lang",
    "forget",
    "privacy",
    "agree",
    "withdraw",
    "optin",
    "optout",
)
# Moderator commands; anyone else who sends one is refused and logged.
MODERATOR_COMMANDS = ("cases", *CASE_ACTIONS)
_FORGET_YES = "forget:yes"
_FORGET_NO = "forget:no"
_CONSENT_AGREE = "consent:agree"

# Update types the bot requests from Telegram; Telegram delivers no others.
ALLOWED_UPDATES = [Update.MESSAGE, Update.EDITED_MESSAGE, Update.CALLBACK_QUERY]

# Media a user may send instead of text; each gets the "text only" note in private chats.
_NON_TEXT = (
    filters.Sticker.ALL
    | filters.VOICE
    | filters.AUDIO
    | filters.VIDEO
    | filters.VIDEO_NOTE
    | filters.PHOTO
    | filters.Document.ALL
    | filters.LOCATION
    | filters.CONTACT
    | filters.ANIMATION
    | filters.POLL
    | filters.VENUE
    | filters.Dice.ALL
)


class PerUserUpdateProcessor(BaseUpdateProcessor):
    """Process updates concurrently, but one user's (or chat's) updates strictly in order.

    PTB starts one task per update in arrival order. Each task takes its user's
    lock before its first suspension point, and asyncio locks are FIFO, so a
    user's updates run one after the other in the order Telegram sent them.
    """

    def __init__(self, max_concurrent_updates: int) -> None:
        super().__init__(max_concurrent_updates)
        self._locks = KeyedLocks()
        self.in_flight = InFlight()
        # Set when the shutdown grace ran out; later updates are dropped unhandled.
        self.closed = False

    async def do_process_update(self, update: object, coroutine: Awaitable[Any]) -> None:
        if self.closed:
            if inspect.iscoroutine(coroutine):
                coroutine.close()
            update_id = update.update_id if isinstance(update, Update) else None
            _LOGGER.warning("Dropped update %s: the shutdown grace ran out", update_id)
            return
        with self.in_flight.track():
            async with self._locks.hold(_order_key(update)):
                await coroutine

    async def initialize(self) -> None:
        """Nothing to set up."""

    async def shutdown(self) -> None:
        """Nothing to release."""


def _order_key(update: object) -> object:
    if isinstance(update, Update):
        if update.effective_user is not None:
            return ("user", update.effective_user.id)
        if update.effective_chat is not None:
            return ("chat", update.effective_chat.id)
    return ("other", id(update))


class _PollingRequest(HTTPXRequest):
    """The connection for getUpdates, which records whether the newest call failed."""

    def __init__(self) -> None:
        # One connection, as PTB 22's ApplicationBuilder uses for getUpdates by default.
        super().__init__(connection_pool_size=1)
        self.last_call_failed = False

    async def post(self, *args: Any, **kwargs: Any) -> Any:
        try:
            result = await super().post(*args, **kwargs)
        except Exception:
            self.last_call_failed = True
            raise
        self.last_call_failed = False
        return result


class TelegramAdapter:
    """Run one Telegram bot against the conversation manager."""

    def __init__(
        self,
        *,
        manager: ConversationManager,
        settings: TelegramSettings,
        token: str,
        webhook_secret: str | None = None,
    ) -> None:
        self._manager = manager
        self._settings = settings
        self._token = token
        self._webhook_secret = webhook_secret or secrets.token_urlsafe(32)
        self._application: Application | None = None
        self._processor: PerUserUpdateProcessor | None = None
        self._polling_request: _PollingRequest | None = None
        self._bot_username = ""
        self._bot_id = 0
        self.state = AdapterState.CREATED

    # Lifecycle

    async def __aenter__(self) -> TelegramAdapter:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def application(self) -> Application:
        if self._application is None:
            raise RuntimeError("The Telegram adapter is not running; call start() first.")
        return self._application

    async def _initialize(self, application: Application) -> None:
        """Initialize the application (getMe), retrying while the Bot API is unreachable.

        Raises PlatformUnavailable after ``startup_retry_s`` or at once for a rejected token.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.startup_retry_s
        delay = 1.0
        while True:
            try:
                await application.initialize()
                return
            except InvalidToken as exc:
                raise PlatformUnavailable(
                    f"Telegram rejected TELEGRAM_BOT_TOKEN: {exc}; check the token."
                ) from exc
            except (NetworkError, TimedOut) as exc:
                if loop.time() + delay > deadline:
                    raise PlatformUnavailable(
                        f"The Telegram Bot API at {self._settings.api_base_url} is unreachable: "
                        f"{exc}; check the network or telegram.api_base_url."
                    ) from exc
                _LOGGER.warning("Telegram Bot API unreachable (%s); retrying in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def start(self) -> None:
        if self.state is AdapterState.RUNNING:
            _LOGGER.debug("Telegram adapter already running")
            return
        settings = self._settings
        base = settings.api_base_url.rstrip("/")
        self._processor = PerUserUpdateProcessor(settings.max_concurrent_updates)
        self._polling_request = _PollingRequest()
        application = (
            ApplicationBuilder()
            .token(self._token)
            .base_url(f"{base}/bot")
            .base_file_url(f"{base}/file/bot")
            .concurrent_updates(self._processor)
            # PTB's default pool holds one connection, which would send every
            # reply of every user one after another.
            .connection_pool_size(settings.connection_pool_size)
            .get_updates_request(self._polling_request)
            .build()
        )
        self._add_handlers(application)
        self._application = application

        await self._initialize(application)
        self._bot_username = application.bot.username or ""
        self._bot_id = application.bot.id
        await self._register_commands()
        await application.start()
        if self._manager.safety is not None:
            self._manager.safety.desk.register_link(self)

        if settings.mode == "webhook":
            await self._start_webhook()
        else:
            # Drop a webhook left by an earlier run; Telegram refuses getUpdates while one is set.
            await application.bot.delete_webhook()
            await application.updater.start_polling(
                timeout=settings.poll_timeout_s,
                allowed_updates=ALLOWED_UPDATES,
                error_callback=self._on_polling_error,
            )
        self.state = AdapterState.RUNNING
        _LOGGER.info(
            "Telegram adapter started as @%s in %s mode", self._bot_username, settings.mode
        )

    def is_connected(self) -> bool:
        """Return True while updates can arrive (read by the health check).

        Polling counts as connected unless the newest getUpdates call failed. A
        webhook counts as connected while its server runs, because whether
        Telegram reaches it cannot be seen from here.
        """
        application = self._application
        if self.state is not AdapterState.RUNNING or application is None:
            return False
        updater = application.updater
        if not application.running or updater is None or not updater.running:
            return False
        if self._settings.mode == "webhook":
            return True
        return self._polling_request is not None and not self._polling_request.last_call_failed

    async def stop_intake(self) -> None:
        """Stop polling, or close the webhook server; updates already received are still handled.

        When polling, PTB confirms the fetched updates to Telegram with one last
        getUpdates call, and Telegram keeps the rest for the next process. In
        webhook mode Telegram retries the updates that this server no longer
        accepts.
        """
        application = self._application
        if self.state is not AdapterState.RUNNING or application is None:
            return
        if application.updater is not None and application.updater.running:
            await application.updater.stop()
        _LOGGER.info("Telegram adapter stopped taking updates")

    async def drain(self, timeout_s: float) -> int:
        """Handle every update received so far, for up to ``timeout_s``; return how many were cut.

        At the limit, the handlers still running are cancelled, and the updates
        not yet started are dropped. A cancelled handler sends its user a notice that the
        message is saved, and the users of dropped updates get nothing.
        """
        application = self._application
        processor = self._processor
        if self.state is not AdapterState.RUNNING or application is None or processor is None:
            return 0
        if not application.running:
            return 0
        # Application.stop() waits until every queued update has been handled.
        stopping = asyncio.create_task(application.stop(), name="Telegram:drain")
        done, _ = await asyncio.wait({stopping}, timeout=timeout_s)
        if stopping in done:
            stopping.result()
            return 0
        processor.closed = True
        cancelled = processor.in_flight.cancel_all()
        await stopping
        return len(cancelled)

    async def stop(self) -> None:
        if self.state is not AdapterState.RUNNING or self._application is None:
            return
        self.state = AdapterState.STOPPED
        if self._manager.safety is not None:
            self._manager.safety.desk.unregister_link(PLATFORM)
        application = self._application
        if application.updater is not None and application.updater.running:
            await application.updater.stop()
        if application.running:
            await application.stop()
        await application.shutdown()
        _LOGGER.info("Telegram adapter stopped")

    async def _start_webhook(self) -> None:
        webhook = self._settings.webhook
        if not webhook.public_url:
            raise RuntimeError(
                "telegram.webhook.public_url is required in webhook mode: the HTTPS URL "
                "Telegram posts updates to, for example https://bot.example.org/telegram."
            )
        # PTB's webhook server answers 403 to requests without the secret header,
        # and queues each accepted update before answering 200, so a slow reply
        # never makes Telegram resend.
        await self.application.updater.start_webhook(
            listen=webhook.listen,
            port=webhook.port,
            url_path=webhook.url_path,
            webhook_url=webhook.public_url,
            secret_token=self._webhook_secret,
            allowed_updates=ALLOWED_UPDATES,
        )

    def _on_polling_error(self, error: TelegramError) -> None:
        # PTB calls this from its polling loop and then waits longer after each
        # failure (up to 30 s), so a second poller on the same token backs off.
        if isinstance(error, Conflict):
            _LOGGER.error(
                "Telegram rejected polling with 409 Conflict: another process is polling "
                "with the same bot token, or a webhook is set. Stop the other instance; "
                "this one keeps retrying with growing delays."
            )
        else:
            _LOGGER.warning("Telegram polling failed: %s", error)

    async def _register_commands(self) -> None:
        bot = self.application.bot
        moderator_chat = self._settings.moderator_chat_id
        for locale, language_code in (("en", None), ("zh-CN", "zh")):
            commands = [BotCommand(name, i18n.text(f"command_{name}", locale)) for name in COMMANDS]
            try:
                await bot.set_my_commands(commands, language_code=language_code)
                if moderator_chat is not None:
                    # Only the moderators' chat shows the case commands in its menu.
                    moderator_commands = [
                        BotCommand(name, i18n.text(f"command_{name}", locale))
                        for name in MODERATOR_COMMANDS
                    ]
                    await bot.set_my_commands(
                        moderator_commands,
                        scope=BotCommandScopeChat(moderator_chat),
                        language_code=language_code,
                    )
            except TelegramError as exc:
                _LOGGER.warning("setMyCommands for %s failed: %s", locale, exc)

    # Handlers

    def _add_handlers(self, application: Application) -> None:
        # Group -1 runs first for every update: redeliveries and bots stop there.
        application.add_handler(TypeHandler(Update, self._screen_update), group=-1)

        for name in COMMANDS:
            application.add_handler(CommandHandler(name, self._on_command))
        for name in MODERATOR_COMMANDS:
            application.add_handler(CommandHandler(name, self._on_moderator_command))
        application.add_handler(
            CallbackQueryHandler(self._on_forget_answer, pattern=r"^forget:(yes|no)$")
        )
        application.add_handler(
            CallbackQueryHandler(self._on_consent_button, pattern=r"^consent:agree$")
        )
        text = (filters.TEXT | filters.CAPTION) & ~filters.COMMAND
        application.add_handler(
            MessageHandler(filters.UpdateType.EDITED_MESSAGE & text, self._on_edited)
        )
        application.add_handler(MessageHandler(filters.UpdateType.MESSAGE & text, self._on_text))
        application.add_handler(
            MessageHandler(
                filters.UpdateType.MESSAGE & filters.ChatType.PRIVATE & _NON_TEXT,
                self._on_non_text,
            )
        )
        application.add_error_handler(self._on_error)

    async def _screen_update(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        user = update.effective_user
        # Channel posts have no user; other bots (and this one) are never answered.
        if user is None or user.is_bot:
            raise ApplicationHandlerStop

        # Text turns and edits are stored under their message id, so the core
        # drops a redelivered one itself; everything else is claimed here.
        message = update.message or update.edited_message
        is_turn = message is not None and bool(message.text or message.caption)
        if is_turn and not (message.text or "").startswith("/"):
            return
        if not await self._manager.claim_update(PLATFORM, str(update.update_id)):
            _LOGGER.info("Skipped update %s: handled before", update.update_id)
            raise ApplicationHandlerStop

    async def _on_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message is None:
            return
        text = message.text if message.text is not None else message.caption or ""
        if message.chat_id == self._settings.moderator_chat_id:
            # Moderators talk among themselves there; the bot only takes commands.
            return
        in_group = message.chat.type != ChatType.PRIVATE
        if in_group:
            addressed, text = self._addressed_text(message, text)
            if not addressed:
                return

        incoming = self._incoming(update, text)
        reply = await self._answer_with_typing(message.chat_id, incoming)
        if reply.kind is ReplyKind.CONSENT_REQUIRED:
            await self._ask_consent(message.chat_id, reply.locale)
            return
        if not reply.should_send:
            return
        text_out = reply.text
        if in_group and reply.kind is ReplyKind.GENERATED:
            # The first reply in each group suggests a private chat; the claim
            # makes it the first per group across restarts too.
            if await self._manager.claim_update(PLATFORM, f"group-hint:{message.chat_id}"):
                text_out = f"{text_out}\n\n{i18n.text('group_hint', reply.locale)}"
        await self.send_text(message.chat_id, text_out, reply_to=message if in_group else None)

    async def _on_edited(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.edited_message
        if message is None or message.edit_date is None:
            return
        text = message.text if message.text is not None else message.caption or ""
        if message.chat.type != ChatType.PRIVATE:
            addressed, text = self._addressed_text(message, text)
            if not addressed:
                return
        incoming = self._incoming(update, text, revision=int(message.edit_date.timestamp()))
        await self._manager.handle_edit(incoming)

    async def _on_non_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message is None:
            return
        locale = await self._manager.user_locale(self._incoming(update, ""))
        await self.send_text(message.chat_id, i18n.text("text_only", locale))

    async def _on_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message is None or not message.text:
            return
        name = message.text.split()[0].lstrip("/").split("@")[0].lower()
        incoming = self._incoming(update, message.text)

        if name == "reset":
            reply = await self._manager.reset(incoming)
        elif name == "lang":
            reply = await self._manager.set_locale(incoming, " ".join(context.args or []))
        elif name == "start":
            reply = await self._manager.notice(incoming, "start")
        elif name == "forget":
            await self._ask_forget(message, incoming)
            return
        elif name == "privacy":
            reply = await self._manager.privacy_notice(incoming)
        elif name in ("agree", "withdraw"):
            reply = await self._manager.set_storage_consent(incoming, name == "agree")
        elif name in ("optin", "optout"):
            reply = await self._manager.set_training_consent(incoming, name == "optin")
        else:
            reply = await self._manager.notice(incoming, "bot_help")
        await self.send_text(message.chat_id, reply.text)
        if name == "start" and await self._manager.needs_consent(incoming):
            await self._ask_consent(message.chat_id, reply.locale)

    async def _ask_consent(self, chat_id: int, locale: str) -> None:
        button = InlineKeyboardButton(
            i18n.text("consent_button", locale), callback_data=_CONSENT_AGREE
        )
        await self.send_text(
            chat_id,
            i18n.text("consent_request", locale),
            reply_markup=InlineKeyboardMarkup([[button]]),
        )

    async def _on_consent_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        if query is None or query.message is None:
            return
        with contextlib.suppress(TelegramError):
            await query.answer()
        reply = await self._manager.set_storage_consent(self._incoming(update, ""), True)
        await self.send_text(query.message.chat.id, reply.text)

    async def _ask_forget(self, message: Message, incoming: IncomingMessage) -> None:
        locale = await self._manager.user_locale(incoming)
        keyboard = InlineKeyboardMarkup(
            [
                [
                    InlineKeyboardButton(
                        i18n.text("forget_yes", locale), callback_data=_FORGET_YES
                    ),
                    InlineKeyboardButton(i18n.text("forget_no", locale), callback_data=_FORGET_NO),
                ]
            ]
        )
        await self.send_text(
            message.chat_id, i18n.text("forget_confirm", locale), reply_markup=keyboard
        )

    async def _on_forget_answer(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        if query is None or query.message is None:
            return
        with contextlib.suppress(TelegramError):
            await query.answer()
        incoming = self._incoming(update, "")
        if query.data == _FORGET_YES:
            reply = await self._manager.forget(incoming)
        else:
            reply = await self._manager.notice(incoming, "forget_cancelled")
        await self.send_text(query.message.chat.id, reply.text)

    async def _on_moderator_command(
        self, update: Update, context: ContextTypes.DEFAULT_TYPE
    ) -> None:
        message = update.effective_message
        user = update.effective_user
        if message is None or user is None or not message.text or self._manager.safety is None:
            return
        desk = self._manager.safety.desk
        actor = Actor(PLATFORM, str(user.id), user.id in self._settings.moderator_ids)
        # "/reply 12 text": the case id, then the rest of the message with its line breaks.
        parts = message.text.split(maxsplit=2)
        name = parts[0].lstrip("/").split("@")[0].lower()
        # The chat id here is what telegram.moderator_chat_id needs.
        _LOGGER.info(
            "Moderator command /%s from user %s in chat %s", name, user.id, message.chat_id
        )
        argument = parts[1] if len(parts) > 1 else ""
        rest = parts[2] if len(parts) > 2 else ""

        if name == "cases":
            answer = await desk.list_cases(actor)
        elif name == "escalate" and argument.lower() == "user":
            answer = await self._escalate_user(actor, rest)
        elif not argument.lstrip("#").isdigit():
            answer = await self._moderator_usage(actor, desk)
        else:
            answer = await desk.act(actor, name, int(argument.lstrip("#")), rest)
        await self.send_text(message.chat_id, answer)

    async def _escalate_user(self, actor: Actor, rest: str) -> str:
        assert self._manager.safety is not None
        desk = self._manager.safety.desk
        target, _, note = rest.partition(" ")
        platform, _, user_id = target.rpartition(":")
        if not user_id.isdigit():
            return await self._moderator_usage(actor, desk)
        return await desk.escalate_user(actor, platform or PLATFORM, user_id, note=note)

    async def _moderator_usage(self, actor: Actor, desk: SafetyDesk) -> str:
        if not actor.is_moderator:
            # The refusal text and log line come from the desk.
            return await desk.list_cases(actor)
        return (
            "/cases\n/ack N\n/handoff N\n/reply N text\n/resolve N note\n"
            "/escalate N [note]\n/escalate user [telegram:|discord:]ID [note]"
        )

    # The desk's link to Telegram

    platform = PLATFORM

    async def post_to_moderators(self, text: str) -> bool:
        """Post a case notice to the moderators' chat; False when none is configured."""
        chat_id = self._settings.moderator_chat_id
        if chat_id is None:
            return False
        return bool(await self.send_text(chat_id, text))

    async def send_to_user(self, platform_user_id: str, text: str) -> Delivery:
        """Send to the user's private chat, whose id is their user id."""
        try:
            sent = await self.send_text(int(platform_user_id), text)
        except TelegramError as exc:
            _LOGGER.warning("Sending a safety message to a user failed: %s", exc)
            return Delivery.FAILED
        return Delivery.SENT if sent else Delivery.UNREACHABLE

    def command_hint(self, case_id: int) -> str:
        return f"/ack {case_id} · /handoff {case_id} · /reply {case_id} … · /resolve {case_id} …"

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        update_id = update.update_id if isinstance(update, Update) else None
        _LOGGER.error("Handling Telegram update %s failed", update_id, exc_info=context.error)

    # Message helpers

    def _incoming(self, update: Update, text: str, *, revision: int = 0) -> IncomingMessage:
        user = update.effective_user
        chat = update.effective_chat
        message = update.effective_message
        assert user is not None and chat is not None
        return IncomingMessage(
            platform=PLATFORM,
            chat_id=str(chat.id),
            user_id=str(user.id),
            text=text,
            locale_hint=user.language_code,
            message_id=str(message.message_id) if message is not None else None,
            revision=revision,
        )

    def _addressed_text(self, message: Message, text: str) -> tuple[bool, str]:
        """Return whether a group message is meant for the bot, and its text without the mention."""
        replied = message.reply_to_message
        addressed = bool(
            replied is not None
            and replied.from_user is not None
            and replied.from_user.id == self._bot_id
        )
        mention = f"@{self._bot_username}".lower()
        entities = message.parse_entities() if message.text else message.parse_caption_entities()
        for entity, value in entities.items():
            if entity.type == MessageEntity.MENTION and value.lower() == mention:
                addressed = True
            elif entity.type == MessageEntity.TEXT_MENTION and entity.user is not None:
                addressed = addressed or entity.user.id == self._bot_id
        if addressed and self._bot_username:
            stripped = _remove_case_insensitive(text, mention)
            text = " ".join(stripped.split()) if stripped != text else text
        return addressed, text.strip()

    async def _answer_with_typing(self, chat_id: int, incoming: IncomingMessage) -> Reply:
        typing = asyncio.create_task(self._keep_typing(chat_id), name=f"Telegram:{chat_id}:typing")
        streamer = None
        if self._settings.stream_edits:
            streamer = _EditStreamer(self, chat_id, self._settings.stream_edit_interval_s)
        try:
            reply = await self._manager.handle(
                incoming, on_delta=streamer.on_delta if streamer else None
            )
        except asyncio.CancelledError:
            if self._processor is not None and self._processor.in_flight.cut:
                await tell_reply_cut(
                    self._manager, incoming, lambda text: self.send_text(chat_id, text)
                )
            raise
        finally:
            typing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await typing
        if streamer is not None and reply.kind is ReplyKind.GENERATED:
            await streamer.finish(reply.text)
            reply.text = ""
        elif streamer is not None and streamer.started and reply.should_send:
            # Generation failed after part of the reply was shown: the apology replaces it.
            await streamer.finish(reply.text)
            reply.text = ""
        elif streamer is not None:
            await streamer.finish("")
        return reply

    async def _keep_typing(self, chat_id: int) -> None:
        # A reply that comes within the delay needs no indicator; this also
        # halves the Bot API calls of a busy bot with a fast model.
        await asyncio.sleep(self._settings.typing_delay_s)
        # Best effort: a failed typing indicator never delays or blocks the reply.
        while True:
            try:
                await self.application.bot.send_chat_action(chat_id, ChatAction.TYPING)
            except TelegramError as exc:
                _LOGGER.debug("Typing indicator for chat %s failed: %s", chat_id, exc)
            await asyncio.sleep(self._settings.typing_interval_s)

    async def send_text(
        self,
        chat_id: int,
        text: str,
        *,
        reply_to: Message | None = None,
        reply_markup: InlineKeyboardMarkup | None = None,
    ) -> list[Message]:
        """Send ``text`` split at Telegram's limit, chunk by chunk in order."""
        sent = []
        # With MarkdownV2, a code block cut in two is closed and reopened.
        flavor = MarkdownFlavor.BASIC if self._settings.parse_mode == "markdown_v2" else None
        chunks = split_message(text, MESSAGE_LIMIT, markdown=flavor)
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            message = await self._send_chunk(
                chat_id,
                chunk,
                reply_parameters=(
                    ReplyParameters(message_id=reply_to.message_id)
                    if reply_to is not None and index == 0
                    else None
                ),
                reply_markup=reply_markup if last else None,
            )
            if message is None:
                break
            sent.append(message)
        return sent

    async def _send_chunk(self, chat_id: int, chunk: str, **options: Any) -> Message | None:
        bot = self.application.bot
        markdown = self._settings.parse_mode == "markdown_v2"

        async def send(formatted: bool) -> Message:
            if formatted:
                return await bot.send_message(
                    chat_id, to_markdown_v2(chunk), parse_mode=ParseMode.MARKDOWN_V2, **options
                )
            return await bot.send_message(chat_id, chunk, **options)

        try:
            return await self._with_retries(lambda: send(markdown), chat_id)
        except BadRequest as exc:
            if markdown and "can't parse entities" in str(exc).lower():
                _LOGGER.warning("Chat %s rejected MarkdownV2; resending as plain text", chat_id)
                return await self._with_retries(lambda: send(False), chat_id)
            raise

    async def _with_retries(
        self, action: Callable[[], Awaitable[Message]], chat_id: int
    ) -> Message | None:
        """Run a send, waiting out flood control and retrying network errors with backoff.

        Returns None when the user blocked the bot: that is noted once, never retried.
        """
        attempts = self._settings.max_send_attempts
        delay = 0.5
        for attempt in range(1, attempts + 1):
            try:
                return await action()
            except RetryAfter as exc:
                seconds = _retry_after_seconds(exc)
                _LOGGER.warning(
                    "Flood control for chat %s: waiting %.1f s (attempt %d of %d)",
                    chat_id,
                    seconds,
                    attempt,
                    attempts,
                )
                await asyncio.sleep(seconds)
            except Forbidden as exc:
                # In a private chat the chat id is the user id; a group that
                # removed the bot matches no user and changes nothing.
                _LOGGER.warning("Cannot send to chat %s: %s", chat_id, exc)
                await self._manager.mark_unreachable(PLATFORM, str(chat_id))
                return None
            except BadRequest:
                raise
            except NetworkError as exc:
                if attempt == attempts:
                    raise
                _LOGGER.warning(
                    "Sending to chat %s failed (%s); retrying in %.1f s", chat_id, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        raise RuntimeError(
            f"Flood control rejected {attempts} attempts to send to chat {chat_id}; "
            "raise telegram.max_send_attempts if Telegram asks for longer waits."
        )


class _EditStreamer:
    """Show a reply while it is generated by editing one message, at most once per interval.

    Before the shown text would pass the length limit, that message keeps what
    it shows and a new message continues the reply.
    """

    # Room left below the limit, so the final text (which can differ) still fits.
    _MARGIN = 200

    def __init__(self, adapter: TelegramAdapter, chat_id: int, interval_s: float) -> None:
        self._adapter = adapter
        self._chat_id = chat_id
        self._interval = interval_s
        self._text = ""
        self._offset = 0  # start of the part shown in the current message
        self._message: Message | None = None
        self._shown = ""
        self._last_edit = 0.0

    async def on_delta(self, delta: str) -> None:
        self._text += delta
        now = asyncio.get_running_loop().time()
        if now - self._last_edit < self._interval:
            return
        self._last_edit = now
        await self._show()

    async def _show(self) -> None:
        current = self._text[self._offset :]
        if _utf16_length(current) > MESSAGE_LIMIT - self._MARGIN and self._message is not None:
            self._offset += len(self._shown)
            self._message, self._shown = None, ""
            current = self._text[self._offset :]
        current = split_message(current, MESSAGE_LIMIT - self._MARGIN)[:1]
        if not current or current[0] == self._shown:
            return

        bot = self._adapter.application.bot
        try:
            if self._message is None:
                self._message = await bot.send_message(self._chat_id, current[0])
            else:
                await bot.edit_message_text(
                    current[0], chat_id=self._chat_id, message_id=self._message.message_id
                )
            self._shown = current[0]
        except TelegramError as exc:
            _LOGGER.debug("Streaming edit in chat %s failed: %s", self._chat_id, exc)

    @property
    def started(self) -> bool:
        """Whether a message with part of the reply is already shown."""
        return self._message is not None

    async def finish(self, final: str) -> None:
        """Make the messages show the stored reply, which clean-up may have trimmed."""
        frozen = self._text[: self._offset]
        rest = final[len(frozen) :] if final.startswith(frozen) else final
        chunks = split_message(rest, MESSAGE_LIMIT)
        if not chunks:
            return

        first, others = chunks[0], chunks[1:]
        if self._message is None:
            others = chunks
        elif first != self._shown:
            try:
                await self._adapter.application.bot.edit_message_text(
                    first, chat_id=self._chat_id, message_id=self._message.message_id
                )
            except BadRequest as exc:
                _LOGGER.debug("Final edit in chat %s failed: %s", self._chat_id, exc)
        for chunk in others:
            await self._adapter.send_text(self._chat_id, chunk)


def _retry_after_seconds(error: RetryAfter) -> float:
    # PTB 22 warns that retry_after becomes a timedelta in a later major
    # version; both forms are read here without the warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        wait = error.retry_after
    return wait.total_seconds() if isinstance(wait, dt.timedelta) else float(wait)


def _utf16_length(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _remove_case_insensitive(text: str, fragment: str) -> str:
    lowered = text.lower()
    position = lowered.find(fragment)
    while position != -1:
        text = text[:position] + text[position + len(fragment) :]
        lowered = text.lower()
        position = lowered.find(fragment)
    return text
