"""The Telegram Bot API stand-in, driven by python-telegram-bot's real ``Bot`` over HTTP."""

from __future__ import annotations

import asyncio
import datetime as dtm
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from telegram import Bot, BotCommand, MessageEntity, Update
from telegram.constants import ChatAction as PtbChatAction
from telegram.error import (
    BadRequest,
    Conflict,
    EndPointNotFound,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
)
from telegram.ext import Application, ContextTypes, MessageHandler, filters
from telegram.helpers import escape_markdown

from tests.helpers.telegram_standin import (
    DEFAULT_USER,
    Delay,
    DropConnection,
    EntityParseError,
    TelegramStandin,
    TgUser,
    conflict_terminated,
    parse_html,
    parse_markdown_v2,
    server_error,
    too_many_requests,
)

USER_ID = DEFAULT_USER.id


@pytest.fixture
async def server() -> AsyncIterator[TelegramStandin]:
    async with TelegramStandin() as running:
        yield running


def make_bot(server: TelegramStandin, token: str | None = None) -> Bot:
    return Bot(
        token or server.token,
        base_url=server.base_url,
        base_file_url=server.base_file_url,
    )


@pytest.fixture
async def bot(server: TelegramStandin) -> AsyncIterator[Bot]:
    async with make_bot(server) as running:
        yield running


def last_description(server: TelegramStandin) -> str | None:
    """Return the description of the newest response, as Telegram words it.

    PTB's error messages drop "Bad Request: " and lower-case all but the first letter.
    """
    return server.calls[-1].description


def seconds(value: int | dtm.timedelta) -> float:
    """Return a PTB time period in seconds, whether PTB_TIMEDELTA makes it a timedelta or not."""
    return value.total_seconds() if isinstance(value, dtm.timedelta) else float(value)


# Identity and tokens


async def test_get_me_returns_configured_bot(server: TelegramStandin, bot: Bot) -> None:
    me = await bot.get_me()

    assert me.is_bot is True
    assert me.username == server.bot_username
    assert me.id == int(server.token.split(":")[0])
    assert me.first_name == "MindHarbor"
    assert me.can_join_groups is True
    assert me.can_read_all_group_messages is False


@pytest.mark.parametrize("token", ["42:wrong-token", "not-a-token"])
async def test_wrong_token_raises_invalid_token(server: TelegramStandin, token: str) -> None:
    # Entering the Bot calls getMe; on failure PTB shuts the Bot's HTTP client down again.
    with pytest.raises(InvalidToken):
        async with make_bot(server, token):
            pass


async def test_unknown_method_is_not_found(bot: Bot) -> None:
    with pytest.raises(EndPointNotFound):
        await bot.do_api_request("sendTelepathicMessage", api_kwargs={"chat_id": USER_ID})


# getUpdates


async def test_get_updates_offset_confirms_earlier_updates(
    server: TelegramStandin, bot: Bot
) -> None:
    first = server.enqueue_private_text("one")
    second = server.enqueue_private_text("two")
    third = server.enqueue_private_text("three")

    updates = await bot.get_updates()
    assert [update.message.text for update in updates] == ["one", "two", "three"]
    assert [u.update_id for u in updates] == [
        first["update_id"],
        second["update_id"],
        third["update_id"],
    ]

    # Without an offset nothing is confirmed, so the same updates come again.
    again = await bot.get_updates()
    assert len(again) == 3

    updates = await bot.get_updates(offset=second["update_id"])
    assert [update.message.text for update in updates] == ["two", "three"]
    assert len(server.pending_updates) == 2

    updates = await bot.get_updates(offset=third["update_id"] + 1)
    assert updates == ()
    assert server.pending_updates == []


async def test_get_updates_limit_and_negative_offset(server: TelegramStandin, bot: Bot) -> None:
    for text in ("a", "b", "c", "d"):
        server.enqueue_private_text(text)

    limited = await bot.get_updates(limit=2)
    assert [update.message.text for update in limited] == ["a", "b"]

    newest = await bot.get_updates(offset=-1)
    assert [update.message.text for update in newest] == ["d"]
    assert len(server.pending_updates) == 1


async def test_long_poll_returns_when_update_arrives(server: TelegramStandin, bot: Bot) -> None:
    started = time.monotonic()
    poll = asyncio.create_task(bot.get_updates(timeout=5))
    await asyncio.sleep(0.2)
    assert not poll.done()

    server.enqueue_private_text("wake up")
    updates = await asyncio.wait_for(poll, timeout=3)

    assert [update.message.text for update in updates] == ["wake up"]
    assert time.monotonic() - started < 2


async def test_long_poll_times_out_empty(bot: Bot) -> None:
    started = time.monotonic()
    updates = await bot.get_updates(timeout=1)
    elapsed = time.monotonic() - started

    assert updates == ()
    assert 0.9 <= elapsed < 3


async def test_newer_poller_terminates_older_with_conflict(server: TelegramStandin) -> None:
    async with make_bot(server) as first, make_bot(server) as second:
        older = asyncio.create_task(first.get_updates(timeout=5))
        await asyncio.sleep(0.2)

        newer = await second.get_updates(timeout=0)

        with pytest.raises(Conflict, match="terminated by other getUpdates request"):
            await asyncio.wait_for(older, timeout=3)
    assert newer == ()


async def test_get_updates_conflicts_with_webhook(server: TelegramStandin, bot: Bot) -> None:
    await bot.set_webhook("http://127.0.0.1:9/telegram")

    with pytest.raises(Conflict, match="can't use getUpdates method while webhook is active"):
        await bot.get_updates()

    await bot.delete_webhook()
    assert await bot.get_updates() == ()


async def test_allowed_updates_filters_later_updates(server: TelegramStandin, bot: Bot) -> None:
    await bot.get_updates(allowed_updates=["callback_query"])

    update = server.enqueue_private_text("filtered out")

    assert server.pending_updates == []
    assert server.filtered_updates[-1]["update_id"] == update["update_id"]


# Update helpers, parsed by PTB


async def test_private_text_has_sender_language(server: TelegramStandin, bot: Bot) -> None:
    user = TgUser(id=2002, first_name="Li", username="li_wei", language_code="zh-hans")
    server.enqueue_private_text("你好", user=user)

    (update,) = await bot.get_updates()

    assert update.message.chat.type == "private"
    assert update.message.chat.id == 2002
    assert update.message.from_user.language_code == "zh-hans"
    assert update.message.from_user.is_bot is False


async def test_group_mention_entity_counts_utf16(server: TelegramStandin, bot: Bot) -> None:
    mention = f"@{server.bot_username}"
    server.enqueue_group_text(f"😊 {mention} are you there?")

    (update,) = await bot.get_updates()
    message = update.message
    (entity,) = message.entities

    assert message.chat.type == "supergroup"
    assert entity.type == MessageEntity.MENTION
    # The emoji is two UTF-16 code units, so the mention starts at 3.
    assert entity.offset == 3
    assert message.parse_entity(entity) == mention


async def test_group_command_with_bot_username(server: TelegramStandin, bot: Bot) -> None:
    command = f"/help@{server.bot_username}"
    server.enqueue_group_text(f"{command} please", chat_type="group", chat_id=-4242)

    (update,) = await bot.get_updates()
    (entity,) = update.message.entities

    assert update.message.chat.type == "group"
    assert entity.type == MessageEntity.BOT_COMMAND
    assert update.message.parse_entity(entity) == command


async def test_group_reply_to_bot_message(server: TelegramStandin, bot: Bot) -> None:
    server.add_group_chat()
    sent = await bot.send_message(-1001234567890, "How are you feeling?")
    server.enqueue_group_text("Better, thanks", reply_to=server.sent[-1])

    (update,) = await bot.get_updates()
    replied = update.message.reply_to_message

    assert replied.message_id == sent.message_id
    assert replied.from_user.id == server.bot_user["id"]
    assert update.message.message_id > sent.message_id


async def test_media_and_service_updates_parse(server: TelegramStandin, bot: Bot) -> None:
    other_bot = TgUser(id=3003, first_name="Echo", username="echo_bot", is_bot=True)
    original = server.enqueue_private_text("first draft")
    server.enqueue_edited_text(original["message"], "second draft")
    server.enqueue_photo(caption="my drawing")
    server.enqueue_photo()
    server.enqueue_sticker(emoji="😢")
    server.enqueue_voice(duration=4)
    server.enqueue_document(file_name="diary.txt", caption="read this")
    server.enqueue_location(31.23, 121.47)
    server.enqueue_channel_post("News for everyone")
    server.enqueue_group_text("beep", user=other_bot)

    updates = await bot.get_updates()
    (text, edited, photo, bare_photo, sticker, voice, document, location, post, from_bot) = updates

    assert text.message.text == "first draft"
    assert edited.edited_message.text == "second draft"
    assert edited.edited_message.message_id == text.message.message_id
    assert edited.edited_message.edit_date is not None
    assert photo.message.caption == "my drawing"
    assert len(photo.message.photo) == 2
    assert bare_photo.message.caption is None
    assert sticker.message.sticker.emoji == "😢"
    assert seconds(voice.message.voice.duration) == 4
    assert document.message.document.file_name == "diary.txt"
    assert document.message.caption == "read this"
    assert location.message.location.latitude == pytest.approx(31.23)
    assert post.channel_post.chat.type == "channel"
    assert post.channel_post.from_user is None
    assert post.channel_post.sender_chat.id == post.channel_post.chat.id
    assert from_bot.message.from_user.is_bot is True


async def test_message_ids_increase_per_chat(server: TelegramStandin) -> None:
    alice_first = server.enqueue_private_text("a1")
    alice_second = server.enqueue_private_text("a2")
    bob = server.enqueue_private_text("b1", user=TgUser(id=1002, first_name="Bob"))

    assert alice_second["message"]["message_id"] == alice_first["message"]["message_id"] + 1
    assert bob["message"]["message_id"] == 1


async def test_get_file_downloads_voice(server: TelegramStandin, bot: Bot) -> None:
    update = server.enqueue_voice(content=b"OggS voice bytes")
    file_id = update["message"]["voice"]["file_id"]

    telegram_file = await bot.get_file(file_id)
    content = await telegram_file.download_as_bytearray()

    assert bytes(content) == b"OggS voice bytes"


# sendMessage: length and entity parsing


@pytest.mark.parametrize(
    ("text", "accepted"),
    [
        ("a" * 4096, True),
        ("a" * 4097, False),
        # 2048 emoji are 4096 UTF-16 code units; 2100 are 4200.
        ("😊" * 2048, True),
        ("😊" * 2100, False),
    ],
    ids=["4096-ascii", "4097-ascii", "2048-emoji", "2100-emoji"],
)
async def test_send_message_length_limit(
    server: TelegramStandin, bot: Bot, text: str, accepted: bool
) -> None:
    server.add_private_chat()
    if accepted:
        message = await bot.send_message(USER_ID, text)
        assert message.text == text
        assert server.sent[-1].plain_text == text
    else:
        with pytest.raises(BadRequest, match="Message is too long"):
            await bot.send_message(USER_ID, text)
        assert server.sent == []


async def test_send_message_length_counts_after_parsing(server: TelegramStandin, bot: Bot) -> None:
    server.add_private_chat()
    # 4096 visible characters; the markup around them does not count.
    text = "*" + "a" * 4096 + "*"

    await bot.send_message(USER_ID, text, parse_mode="MarkdownV2")

    assert len(server.sent[-1].plain_text) == 4096


@pytest.mark.parametrize("text", ["", "   \n "])
async def test_send_message_rejects_empty_text(
    server: TelegramStandin, bot: Bot, text: str
) -> None:
    server.add_private_chat()
    with pytest.raises(BadRequest, match="Message text is empty"):
        await bot.send_message(USER_ID, text)


async def test_send_message_unknown_chat_not_found(bot: Bot) -> None:
    with pytest.raises(BadRequest, match="Chat not found"):
        await bot.send_message(55555, "hello")


async def test_markdown_v2_rejects_unescaped_dot(server: TelegramStandin, bot: Bot) -> None:
    server.add_private_chat()
    with pytest.raises(BadRequest) as caught:
        await bot.send_message(USER_ID, "Take a breath.", parse_mode="MarkdownV2")

    assert caught.value.message.startswith("Can't parse entities")
    assert last_description(server) == (
        "Bad Request: can't parse entities: "
        "Character '.' is reserved and must be escaped with the preceding '\\'"
    )
    assert server.sent == []


async def test_markdown_v2_records_plain_text(server: TelegramStandin, bot: Bot) -> None:
    server.add_private_chat()
    text = "*You are not alone\\.* Call [the line](https://example.org/help) \\(24/7\\)\\!"

    message = await bot.send_message(USER_ID, text, parse_mode="MarkdownV2")
    record = server.sent[-1]

    assert record.plain_text == "You are not alone. Call the line (24/7)!"
    assert record.text == text
    assert record.parse_mode == "MarkdownV2"
    assert [entity["type"] for entity in record.entities] == ["bold", "text_link"]
    assert message.parse_entities() == {
        message.entities[0]: "You are not alone.",
        message.entities[1]: "the line",
    }
    assert message.entities[1].url == "https://example.org/help"


@pytest.mark.parametrize(
    ("text", "plain", "entity"),
    [
        # Inside pre only ` and \ are markup, so "." "(" "#" need no escaping.
        (
            '```python\nprint("calm.") # breathe (slowly)\n```',
            'print("calm.") # breathe (slowly)\n',
            {"type": "pre", "language": "python"},
        ),
        ("`a\\`b\\\\c`", "a`b\\c", {"type": "code"}),
        ("||hidden||", "hidden", {"type": "spoiler"}),
        ("__under__", "under", {"type": "underline"}),
        ("~gone~", "gone", {"type": "strikethrough"}),
        (">quoted line", "quoted line", {"type": "blockquote"}),
    ],
    ids=["pre-block", "code-escapes", "spoiler", "underline", "strikethrough", "blockquote"],
)
async def test_markdown_v2_accepts_entities(
    server: TelegramStandin, bot: Bot, text: str, plain: str, entity: dict[str, Any]
) -> None:
    server.add_private_chat()

    await bot.send_message(USER_ID, text, parse_mode="MarkdownV2")
    (parsed,) = server.sent[-1].entities

    assert server.sent[-1].plain_text == plain
    assert parsed.items() >= entity.items()
    assert parsed["offset"] == 0


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("`one`two`", "Can't find end of Code entity at byte offset 8"),
        # Crossed markers open new entities; the error names the innermost one.
        ("*bold _italic*_", "Can't find end of Italic entity at byte offset 14"),
        ("```\nnever closed", "Can't find end of Pre entity at byte offset 0"),
        ("||spoiler", "Can't find end of Spoiler entity at byte offset 0"),
        ("||spoiler|", "Character '|' is reserved and must be escaped with the preceding '\\'"),
        ("[link](https://example.org", "Can't find end of a URL at byte offset 7"),
        ("a > b", "Character '>' is reserved and must be escaped with the preceding '\\'"),
        ("done!", "Character '!' is reserved and must be escaped with the preceding '\\'"),
    ],
    ids=[
        "code-backtick",
        "crossed",
        "pre-unclosed",
        "spoiler-unclosed",
        "single-bar",
        "url",
        "gt",
        "bang",
    ],
)
async def test_markdown_v2_rejects_invalid_markup(
    server: TelegramStandin, bot: Bot, text: str, error: str
) -> None:
    server.add_private_chat()
    with pytest.raises(BadRequest, match="Can't parse entities"):
        await bot.send_message(USER_ID, text, parse_mode="MarkdownV2")
    assert last_description(server) == f"Bad Request: can't parse entities: {error}"


async def test_html_parse_mode(server: TelegramStandin, bot: Bot) -> None:
    server.add_private_chat()

    await bot.send_message(USER_ID, "<b>Breathe</b> in &amp; out &lt;3", parse_mode="HTML")
    assert server.sent[-1].plain_text == "Breathe in & out <3"
    assert server.sent[-1].entities == [{"type": "bold", "offset": 0, "length": 7}]

    with pytest.raises(BadRequest, match="Can't parse entities"):
        await bot.send_message(USER_ID, "1 < 2", parse_mode="HTML")
    assert last_description(server) == (
        'Bad Request: can\'t parse entities: Unsupported start tag "" at byte offset 2'
    )


async def test_reply_to_unknown_message_rejected(server: TelegramStandin, bot: Bot) -> None:
    server.add_private_chat()
    with pytest.raises(BadRequest, match="Message to be replied not found"):
        await bot.send_message(USER_ID, "hi", reply_to_message_id=999)

    message = await bot.send_message(
        USER_ID, "hi", reply_to_message_id=999, allow_sending_without_reply=True
    )
    assert message.reply_to_message is None


async def test_reply_parameters_recorded(server: TelegramStandin, bot: Bot) -> None:
    incoming = server.enqueue_private_text("I feel low")
    message_id = incoming["message"]["message_id"]

    message = await bot.send_message(USER_ID, "I'm here.", reply_to_message_id=message_id)

    assert message.reply_to_message.text == "I feel low"
    assert server.sent[-1].reply_to_message_id == message_id


# editMessageText and other methods


async def test_edit_message_text(server: TelegramStandin, bot: Bot) -> None:
    server.add_private_chat()
    sent = await bot.send_message(USER_ID, "Thinking…")

    with pytest.raises(BadRequest, match="Message is not modified"):
        await bot.edit_message_text("Thinking…", chat_id=USER_ID, message_id=sent.message_id)

    edited = await bot.edit_message_text(
        "*Done\\.*", chat_id=USER_ID, message_id=sent.message_id, parse_mode="MarkdownV2"
    )
    record = server.sent[-1]

    assert edited.text == "Done."
    assert edited.edit_date is not None
    assert record.plain_text == "Done."
    assert record.previous_texts == ["Thinking…"]
    assert len(server.sent) == 1

    with pytest.raises(BadRequest, match="Message is too long"):
        await bot.edit_message_text("x" * 4097, chat_id=USER_ID, message_id=sent.message_id)
    with pytest.raises(BadRequest, match="Message to edit not found"):
        await bot.edit_message_text("other", chat_id=USER_ID, message_id=9999)


async def test_delete_message(server: TelegramStandin, bot: Bot) -> None:
    server.add_private_chat()
    sent = await bot.send_message(USER_ID, "oops")

    assert await bot.delete_message(USER_ID, sent.message_id) is True
    assert server.sent[-1].deleted is True
    with pytest.raises(BadRequest, match="Message to delete not found"):
        await bot.delete_message(USER_ID, sent.message_id)


async def test_get_chat_parses_in_ptb(server: TelegramStandin, bot: Bot) -> None:
    server.add_group_chat(-100777, "Peer support")

    chat = await bot.get_chat(-100777)

    assert chat.title == "Peer support"
    assert chat.type == "supergroup"


async def test_webhook_reply_runs_method(server: TelegramStandin, bot: Bot) -> None:
    server.add_private_chat()

    async def reply_with_method(request: web.Request) -> web.Response:
        update = await request.json()
        chat_id = update["message"]["chat"]["id"]
        return web.json_response({"method": "sendMessage", "chat_id": chat_id, "text": "pong"})

    app = web.Application()
    app.router.add_post("/hook", reply_with_method)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        await bot.set_webhook(f"http://127.0.0.1:{runner.addresses[0][1]}/hook")
        server.enqueue_private_text("ping")
        (message,) = await server.wait_for_messages(USER_ID, 1, timeout=3)
    finally:
        await bot.delete_webhook()
        await runner.cleanup()

    webhook_calls = [call for call in server.calls if call.source == "webhook-reply"]
    assert message.plain_text == "pong"
    assert [call.method for call in webhook_calls] == ["sendMessage"]
    assert webhook_calls[0].status == 200


async def test_callback_query_answered_once(server: TelegramStandin, bot: Bot) -> None:
    server.add_private_chat()
    await bot.send_message(USER_ID, "Did this help?")
    server.enqueue_callback_query("helpful:yes", message=server.sent[-1])

    (update,) = await bot.get_updates()
    query = update.callback_query

    assert query.data == "helpful:yes"
    assert query.message.message_id == server.sent[-1].message_id
    assert await bot.answer_callback_query(query.id, text="Thanks!") is True
    assert server.answered_callback_queries[-1]["text"] == "Thanks!"
    with pytest.raises(BadRequest, match="Query is too old"):
        await bot.answer_callback_query(query.id)


async def test_leave_chat_recorded(server: TelegramStandin, bot: Bot) -> None:
    server.add_group_chat(-100555, "Noisy group")

    assert await bot.leave_chat(-100555) is True
    assert server.left_chats == [-100555]


async def test_chat_action_recorded(server: TelegramStandin, bot: Bot) -> None:
    server.add_private_chat()

    await bot.send_chat_action(USER_ID, PtbChatAction.TYPING)
    action = await server.wait_for_chat_action(USER_ID, "typing", timeout=1)

    assert action.chat_id == USER_ID
    with pytest.raises(BadRequest, match="Wrong parameter action"):
        await bot.send_chat_action(USER_ID, "dancing")


async def test_commands_recorded_per_language(server: TelegramStandin, bot: Bot) -> None:
    english = [BotCommand("start", "Start talking"), BotCommand("reset", "Start over")]
    chinese = [BotCommand("start", "开始聊天")]

    await bot.set_my_commands(english)
    await bot.set_my_commands(chinese, language_code="zh")

    assert server.commands_for("") == [
        {"command": "start", "description": "Start talking"},
        {"command": "reset", "description": "Start over"},
    ]
    assert server.commands_for("zh") == [{"command": "start", "description": "开始聊天"}]
    assert await bot.get_my_commands(language_code="zh") == tuple(chinese)
    assert await bot.get_my_commands(language_code="de") == ()

    with pytest.raises(BadRequest):
        await bot.set_my_commands([BotCommand("Start", "capital letters are invalid")])
    assert last_description(server) == "Bad Request: BOT_COMMAND_INVALID"


# Scripted faults


async def test_429_raises_retry_after(server: TelegramStandin, bot: Bot) -> None:
    server.add_private_chat()
    server.fail_next("sendMessage", too_many_requests(7))

    with pytest.raises(RetryAfter) as caught:
        await bot.send_message(USER_ID, "first")

    assert seconds(caught.value.retry_after) == 7
    assert server.calls[-1].description == "Too Many Requests: retry after 7"
    # The queue held one fault, so the next request goes through.
    await bot.send_message(USER_ID, "second")
    assert [message.plain_text for message in server.sent] == ["second"]


async def test_blocked_chat_raises_forbidden_until_cleared(
    server: TelegramStandin, bot: Bot
) -> None:
    server.add_private_chat()
    server.block_chat(USER_ID)

    for _ in range(2):
        with pytest.raises(Forbidden, match="bot was blocked by the user"):
            await bot.send_message(USER_ID, "are you there?")
    with pytest.raises(Forbidden):
        await bot.send_chat_action(USER_ID, PtbChatAction.TYPING)

    server.unblock_chat(USER_ID)
    await bot.send_message(USER_ID, "welcome back")
    assert len(server.sent) == 1


async def test_scripted_conflict_raises_conflict(server: TelegramStandin, bot: Bot) -> None:
    server.fail_next("getUpdates", conflict_terminated())

    with pytest.raises(Conflict, match="terminated by other getUpdates request"):
        await bot.get_updates()


@pytest.mark.parametrize(
    "fault",
    [server_error(502), DropConnection()],
    ids=["502", "dropped-connection"],
)
async def test_server_faults_raise_network_error(
    server: TelegramStandin, bot: Bot, fault: Any
) -> None:
    server.add_private_chat()
    server.fail_next("sendMessage", fault)

    with pytest.raises(NetworkError):
        await bot.send_message(USER_ID, "hello")
    await bot.send_message(USER_ID, "hello again")
    assert [message.plain_text for message in server.sent] == ["hello again"]


async def test_delay_fault_holds_request(server: TelegramStandin, bot: Bot) -> None:
    server.fail_next("getMe", Delay(0.3))

    started = time.monotonic()
    me = await bot.get_me()

    assert me.username == server.bot_username
    assert time.monotonic() - started >= 0.3


# Webhooks


class WebhookReceiver:
    """A small aiohttp server on 127.0.0.1 that plays the bot's webhook endpoint."""

    def __init__(self, secret_token: str, fail_first: int = 0) -> None:
        self.secret_token = secret_token
        self.fail_first = fail_first
        self.received: list[tuple[str | None, dict[str, Any]]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        secret = request.headers.get("X-Telegram-Bot-Api-Secret-Token")
        if secret != self.secret_token:
            return web.Response(status=403)
        self.received.append((secret, await request.json()))
        if len(self.received) <= self.fail_first:
            return web.Response(status=500)
        return web.Response(status=200)

    async def __aenter__(self) -> WebhookReceiver:
        app = web.Application()
        app.router.add_post("/telegram", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/telegram"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def test_webhook_delivers_with_secret_and_retries(server: TelegramStandin, bot: Bot) -> None:
    queued = server.enqueue_private_text("sent before the webhook")
    async with WebhookReceiver("s3cret-Token_1", fail_first=1) as receiver:
        assert await bot.set_webhook(receiver.url, secret_token="s3cret-Token_1") is True
        live = server.enqueue_private_text("sent after the webhook")

        await server.wait_for_deliveries(3, timeout=3)
        await server.wait_until_consumed(timeout=3)
        info = await bot.get_webhook_info()

    assert server.webhook is not None
    assert server.webhook.secret_token == "s3cret-Token_1"
    statuses = [(d.update_id, d.attempt, d.status) for d in server.deliveries]
    assert statuses == [
        (queued["update_id"], 1, 500),
        (queued["update_id"], 2, 200),
        (live["update_id"], 1, 200),
    ]
    assert [secret for secret, _ in receiver.received] == ["s3cret-Token_1"] * 3
    assert receiver.received[-1][1] == live
    assert Update.de_json(receiver.received[-1][1], bot).message.text == "sent after the webhook"
    assert info.url == receiver.url
    assert info.pending_update_count == 0
    assert info.last_error_message == "Wrong response from the webhook: 500"


async def test_webhook_gives_up_after_max_attempts(server: TelegramStandin, bot: Bot) -> None:
    async with WebhookReceiver("right-secret") as receiver:
        # The bot registers a different secret, so the receiver responds 403 every time.
        await bot.set_webhook(receiver.url, secret_token="other-secret")
        server.enqueue_private_text("never accepted")

        await server.wait_for_deliveries(3, timeout=3)
        await server.wait_until_consumed(timeout=3)

    assert [d.status for d in server.deliveries] == [403, 403, 403]
    assert receiver.received == []


@pytest.mark.parametrize(
    ("secret", "status"),
    [("right-secret", 200), ("wrong-secret", 403), (None, 403)],
    ids=["right", "wrong", "missing"],
)
async def test_post_raw_update_status(
    server: TelegramStandin, secret: str | None, status: int
) -> None:
    update = {"update_id": 1, "message": {"message_id": 1, "date": 0, "chat": {"id": 1}}}
    async with WebhookReceiver("right-secret") as receiver:
        answered = await server.post_raw_update(update, url=receiver.url, secret_token=secret)

    assert answered == status


async def test_set_webhook_rejects_non_loopback_url(bot: Bot) -> None:
    with pytest.raises(BadRequest, match="Bad webhook"):
        await bot.set_webhook("https://example.org/telegram")


async def test_delete_webhook_drops_pending_updates(server: TelegramStandin, bot: Bot) -> None:
    server.enqueue_private_text("stale")

    assert await bot.delete_webhook(drop_pending_updates=True) is True

    assert server.pending_updates == []
    assert await bot.get_updates() == ()


async def test_wait_for_messages_times_out_with_context(server: TelegramStandin, bot: Bot) -> None:
    server.add_private_chat()
    await bot.send_message(USER_ID, "only one")

    messages = await server.wait_for_messages(USER_ID, 1, timeout=1)
    assert [message.plain_text for message in messages] == ["only one"]
    with pytest.raises(TimeoutError, match="only one"):
        await server.wait_for_messages(USER_ID, 2, timeout=0.2)


# PTB's Application in both update modes


def build_echo_application(server: TelegramStandin) -> Application:
    application = (
        Application.builder()
        .token(server.token)
        .base_url(server.base_url)
        .base_file_url(server.base_file_url)
        .build()
    )

    async def echo(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await context.bot.send_chat_action(update.effective_chat.id, PtbChatAction.TYPING)
        await update.effective_message.reply_text(
            f"echo: {update.effective_message.text}", do_quote=True
        )

    application.add_handler(MessageHandler(filters.TEXT, echo))
    return application


async def test_application_long_polling_round_trip(server: TelegramStandin) -> None:
    application = build_echo_application(server)
    server.enqueue_private_text("queued before start")

    async with application:
        await application.start()
        await application.updater.start_polling(poll_interval=0, timeout=1)
        server.enqueue_private_text("sent while polling")

        messages = await server.wait_for_messages(USER_ID, 2, timeout=5)

        await application.updater.stop()
        await application.stop()

    assert [m.plain_text for m in messages] == [
        "echo: queued before start",
        "echo: sent while polling",
    ]
    assert all(m.reply_to_message_id is not None for m in messages)
    assert server.chat_actions[0].action == "typing"
    called = {call.method for call in server.calls}
    assert {"getMe", "deleteWebhook", "getUpdates", "sendMessage"} <= called


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_application_webhook_round_trip(server: TelegramStandin) -> None:
    application = build_echo_application(server)
    port = free_port()
    webhook_url = f"http://127.0.0.1:{port}/telegram"

    async with application:
        await application.start()
        await application.updater.start_webhook(
            listen="127.0.0.1",
            port=port,
            url_path="telegram",
            webhook_url=webhook_url,
            secret_token="webhook-secret",
        )
        server.enqueue_private_text("hello over the webhook")
        messages = await server.wait_for_messages(USER_ID, 1, timeout=5)

        wrong_secret = await server.post_raw_update(
            server.updates[-1], secret_token="not-the-secret"
        )

        await application.updater.stop()
        await application.stop()

    assert [m.plain_text for m in messages] == ["echo: hello over the webhook"]
    assert server.webhook is not None
    assert server.webhook.url == webhook_url
    assert [d.status for d in server.deliveries] == [200]
    assert server.deliveries[0].secret_token_sent == "webhook-secret"
    assert wrong_secret == 403


# The parsers on their own


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_ptb_escaped_markdown_round_trips(text: str) -> None:
    assert parse_markdown_v2(escape_markdown(text, version=2)).text == text


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=200))
def test_ptb_escaped_code_round_trips(text: str) -> None:
    parsed = parse_markdown_v2("`" + escape_markdown(text, version=2, entity_type="code") + "`")

    assert parsed.text == text
    assert parsed.entities == [
        {"type": "code", "offset": 0, "length": len(text.encode("utf-16-le")) // 2}
    ]


@pytest.mark.parametrize(
    ("source", "plain", "entities"),
    [
        ("_a __b__ c_", "a b c", [("italic", 0, 5), ("underline", 2, 1)]),
        ("*😊 x*", "😊 x", [("bold", 0, 4)]),
        ("`` empty code", " empty code", []),
        ("[site](example\\.org)", "site", [("text_link", 0, 4)]),
        (">one\n>two||\nthree", "one\ntwo\nthree", [("expandable_blockquote", 0, 8)]),
        ("keep \\a\\b and trailing \\", "keep ab and trailing \\", []),
    ],
    ids=["nested", "utf16", "empty", "link", "expandable", "escapes"],
)
def test_markdown_v2_parser_cases(
    source: str, plain: str, entities: list[tuple[str, int, int]]
) -> None:
    parsed = parse_markdown_v2(source)

    assert parsed.text == plain
    assert [(e["type"], e["offset"], e["length"]) for e in parsed.entities] == entities


def test_markdown_v2_error_offsets_are_utf8_bytes() -> None:
    # "😊 " is five UTF-8 bytes, so the unclosed "_" sits at byte 5.
    with pytest.raises(EntityParseError, match="Italic entity at byte offset 5"):
        parse_markdown_v2("😊 _oops")


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("<i>a</em>", 'Unmatched end tag at byte offset 4, expected "</i>", found "</em>"'),
        ("<b>open", 'Can\'t find end tag corresponding to start tag "b"'),
        ("<blink>x</blink>", 'Unsupported start tag "blink" at byte offset 0'),
    ],
    ids=["unmatched", "unclosed", "unsupported"],
)
def test_html_parser_errors(source: str, error: str) -> None:
    with pytest.raises(EntityParseError) as caught:
        parse_html(source)
    assert str(caught.value) == error


def test_html_pre_code_language_merges() -> None:
    parsed = parse_html('<pre><code class="language-python">x = 1</code></pre>')

    assert parsed.entities == [{"type": "pre", "offset": 0, "length": 5, "language": "python"}]


async def test_json_and_query_requests_accepted(server: TelegramStandin) -> None:
    server.add_private_chat()
    method_url = f"{server.base_url}{server.token}"
    reply = {"message_id": 77, "allow_sending_without_reply": True}

    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{method_url}/sendMessage",
            json={"chat_id": USER_ID, "text": "json body", "reply_parameters": reply},
        ) as response:
            json_answer = await response.json()
        # Method names are matched without regard to case, as on api.telegram.org.
        async with session.get(
            f"{method_url}/SENDMESSAGE", params={"chat_id": str(USER_ID), "text": "query"}
        ) as response:
            query_answer = await response.json()
        async with session.post(f"{method_url}/sendMessage", json={"chat_id": USER_ID}) as response:
            error_answer = await response.json()
            error_status = response.status

    assert json_answer["ok"] is True
    assert json_answer["result"]["text"] == "json body"
    assert query_answer["result"]["text"] == "query"
    assert error_status == 400
    assert error_answer == {
        "ok": False,
        "error_code": 400,
        "description": "Bad Request: message text is empty",
    }
