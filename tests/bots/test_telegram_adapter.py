"""The Telegram adapter end to end: real python-telegram-bot against the stand-in Bot API server."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from bots.rendering import utf16_length
from bots.telegram_adapter import TelegramAdapter
from core.config import DatabaseSettings, Secrets, Settings, TelegramSettings
from core.service import Service
from core.storage.models import Turn, User
from tests.helpers.fakes import FakeGenerator
from tests.helpers.telegram_standin import (
    DropConnection,
    TelegramStandin,
    TgUser,
    bad_request,
    conflict_terminated,
    server_error,
    too_many_requests,
)

ALICE = TgUser(id=1001, first_name="Alice", username="alice", language_code="en")
BO = TgUser(id=1002, first_name="波", username="bo", language_code="zh-hans")
OTHER_BOT = TgUser(id=4242, first_name="Helper", username="helper_bot", is_bot=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Harness:
    """A running service and Telegram adapter wired to a stand-in server."""

    def __init__(self, server: TelegramStandin, service: Service, generator: FakeGenerator):
        self.server = server
        self.service = service
        self.generator = generator
        self.adapter: TelegramAdapter | None = None

    async def start_adapter(self, **telegram: object) -> TelegramAdapter:
        settings = TelegramSettings(api_base_url=self.server.url, poll_timeout_s=1, **telegram)
        self.adapter = TelegramAdapter(
            manager=self.service.manager,
            settings=settings,
            token=self.server.token,
            webhook_secret="s3cret-token",
        )
        await self.adapter.start()
        return self.adapter

    async def user_turns(self, telegram_user_id: int) -> list[Turn]:
        async with self.service.engine.connect() as connection:
            rows = await connection.execute(
                select(Turn.role, Turn.content, Turn.revision)
                .join(User, User.id == Turn.user_id)
                .where(User.platform == "telegram", User.platform_user_id == str(telegram_user_id))
                .order_by(Turn.created_at, Turn.id)
            )
            return list(rows)

    async def all_turn_count(self) -> int:
        async with self.service.engine.connect() as connection:
            return len(list(await connection.execute(select(Turn.id))))


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    generator = FakeGenerator()
    settings = Settings(database=DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'tg.db'}"))
    async with TelegramStandin() as server:
        async with Service(settings, Secrets(), generator=generator) as service:
            built = Harness(server, service, generator)
            yield built
            if built.adapter is not None:
                await built.adapter.stop()


@pytest.fixture
async def polling(harness: Harness) -> Harness:
    await harness.start_adapter()
    return harness


# Private chats


async def test_private_message_answered_and_stored(polling: Harness) -> None:
    server = polling.server
    server.enqueue_private_text("I can't sleep", user=ALICE)

    [reply] = await server.wait_for_messages(ALICE.id, 1)

    assert reply.text == "reply to: I can't sleep"
    assert [(role, content) for role, content, _ in await polling.user_turns(ALICE.id)] == [
        ("user", "I can't sleep"),
        ("assistant", "reply to: I can't sleep"),
    ]


async def test_commands_registered_in_both_languages(polling: Harness) -> None:
    english = [command["command"] for command in polling.server.commands_for("")]
    chinese = polling.server.commands_for("zh")

    assert english == [
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
    ]
    assert [command["command"] for command in chinese] == english
    assert chinese[2]["description"] == "开始新的对话"


async def test_start_and_help_in_user_language(polling: Harness) -> None:
    server = polling.server
    server.enqueue_private_text("/start", user=BO)
    server.enqueue_private_text("/help", user=ALICE)

    [start] = await server.wait_for_messages(BO.id, 1)
    [help_text] = await server.wait_for_messages(ALICE.id, 1)

    assert start.text.startswith("你好，我是 MindHarbor")
    assert "/forget" in start.text
    assert "/lang zh|en" in help_text.text
    assert await polling.all_turn_count() == 0


async def test_lang_and_reset_commands(polling: Harness) -> None:
    server = polling.server
    server.enqueue_private_text("hello", user=ALICE)
    await server.wait_for_messages(ALICE.id, 1)
    server.enqueue_private_text("/lang zh", user=ALICE)
    server.enqueue_private_text("/reset", user=ALICE)
    server.enqueue_private_text("again", user=ALICE)

    messages = await server.wait_for_messages(ALICE.id, 4)

    assert messages[1].text == "接下来我会用中文回复你。"
    assert messages[2].text.startswith("我们重新开始")
    assert polling.generator.calls[-1][1:] == [polling.generator.calls[-1][-1]], (
        "the reset conversation starts without the earlier turns"
    )
    assert polling.generator.calls[-1][0].content.startswith("你是 MindHarbor")


async def test_forget_asks_then_deletes(polling: Harness) -> None:
    server = polling.server
    server.enqueue_private_text("remember this", user=ALICE)
    await server.wait_for_messages(ALICE.id, 1)
    server.enqueue_private_text("/forget", user=ALICE)

    question = (await server.wait_for_messages(ALICE.id, 2))[-1]
    assert question.text.startswith("This deletes every message")
    buttons = question.reply_markup["inline_keyboard"][0]
    assert [button["callback_data"] for button in buttons] == ["forget:yes", "forget:no"]
    assert len(await polling.user_turns(ALICE.id)) == 2

    server.enqueue_callback_query("forget:yes", message=question, user=ALICE)
    report = (await server.wait_for_messages(ALICE.id, 3))[-1]

    assert report.text.startswith("Done. I deleted 2 messages in 1 conversations.")
    assert await polling.user_turns(ALICE.id) == []
    assert server.answered_callback_queries


async def test_forget_cancelled_keeps_data(polling: Harness) -> None:
    server = polling.server
    server.enqueue_private_text("keep this", user=ALICE)
    await server.wait_for_messages(ALICE.id, 1)
    server.enqueue_private_text("/forget", user=ALICE)
    question = (await server.wait_for_messages(ALICE.id, 2))[-1]

    server.enqueue_callback_query("forget:no", message=question, user=ALICE)
    answer = (await server.wait_for_messages(ALICE.id, 3))[-1]

    assert answer.text == "Nothing was deleted."
    assert len(await polling.user_turns(ALICE.id)) == 2


# Groups


async def test_group_message_without_mention_ignored(polling: Harness) -> None:
    server = polling.server
    server.enqueue_group_text("just chatting with friends", user=ALICE)
    server.enqueue_group_text(f"@{server.bot_username} are you there?", user=BO)

    [reply] = await server.wait_for_messages(-1001234567890, 1)

    assert reply.text.startswith("reply to: are you there?")
    assert await polling.user_turns(ALICE.id) == []


async def test_group_mention_stripped_and_hint_once(polling: Harness) -> None:
    server = polling.server
    server.enqueue_group_text(f"@{server.bot_username} I feel low", user=ALICE)
    first = (await server.wait_for_messages(-1001234567890, 1))[0]
    server.enqueue_group_text("thanks", user=ALICE, reply_to=first)
    second = (await server.wait_for_messages(-1001234567890, 2))[1]

    assert first.text.startswith("reply to: I feel low")
    assert "write to me privately" in first.text
    assert second.text == "reply to: thanks"
    stored = [content for role, content, _ in await polling.user_turns(ALICE.id) if role == "user"]
    assert stored == ["I feel low", "thanks"]


async def test_group_command_addressed_to_bot(polling: Harness) -> None:
    server = polling.server
    server.enqueue_group_text(f"/help@{server.bot_username}", user=ALICE)

    [reply] = await server.wait_for_messages(-1001234567890, 1)

    assert "/reset" in reply.text


# Kinds of message


async def test_caption_counts_as_text(polling: Harness) -> None:
    polling.server.enqueue_photo(caption="this photo is my home", user=ALICE)

    [reply] = await polling.server.wait_for_messages(ALICE.id, 1)

    assert reply.text == "reply to: this photo is my home"


@pytest.mark.parametrize(
    "send",
    [
        pytest.param(lambda server: server.enqueue_sticker(user=BO), id="sticker"),
        pytest.param(lambda server: server.enqueue_voice(user=BO), id="voice"),
        pytest.param(lambda server: server.enqueue_photo(user=BO), id="photo-without-caption"),
        pytest.param(lambda server: server.enqueue_document(user=BO), id="document"),
        pytest.param(lambda server: server.enqueue_location(31.2, 121.5, user=BO), id="location"),
    ],
)
async def test_non_text_gets_note_then_text_works(polling: Harness, send) -> None:
    server = polling.server
    send(server)
    [note] = await server.wait_for_messages(BO.id, 1)
    server.enqueue_private_text("我还在", user=BO)
    reply = (await server.wait_for_messages(BO.id, 2))[1]

    assert note.text == "我只能读懂文字消息，请用文字告诉我。"
    assert reply.text == "reply to: 我还在"
    assert [content for role, content, _ in await polling.user_turns(BO.id)] == [
        "我还在",
        "reply to: 我还在",
    ]


async def test_bots_and_channels_ignored(polling: Harness) -> None:
    server = polling.server
    server.enqueue_private_text("I am a bot", user=OTHER_BOT)
    server.enqueue_channel_post("channel news")
    server.enqueue_private_text("human here", user=ALICE)

    await server.wait_for_messages(ALICE.id, 1)
    await server.wait_until_consumed()

    assert [message.chat_id for message in server.sent] == [ALICE.id]
    assert await polling.user_turns(OTHER_BOT.id) == []


async def test_edit_stored_without_second_reply(polling: Harness) -> None:
    server = polling.server
    update = server.enqueue_private_text("I feel bda", user=ALICE)
    await server.wait_for_messages(ALICE.id, 1)

    server.enqueue_edited_text(update["message"], "I feel bad")
    await server.wait_until_consumed()
    server.enqueue_private_text("next", user=ALICE)
    await server.wait_for_messages(ALICE.id, 2)

    assert len(server.sent_to(ALICE.id)) == 2
    user_turns = [
        (content, revision)
        for role, content, revision in await polling.user_turns(ALICE.id)
        if role == "user"
    ]
    assert user_turns[0] == ("I feel bda", 0)
    assert user_turns[1][0] == "I feel bad"
    assert user_turns[1][1] > 0
    assert polling.generator.calls[-1][1].content == "I feel bad"


# Rendering


async def test_long_reply_split_within_limit(polling: Harness) -> None:
    paragraph = "You are not alone in this. " * 60 + "😊👩‍👩‍👧‍👦"
    polling.generator.reply = "\n\n".join([paragraph] * 8)
    polling.server.enqueue_private_text("talk to me", user=ALICE)

    await polling.server.wait_for_messages(ALICE.id, 2)
    await asyncio.sleep(0.3)
    chunks = polling.server.sent_to(ALICE.id)

    assert len(chunks) >= 3
    assert all(0 < utf16_length(chunk.text) <= 4096 for chunk in chunks)
    joined = "".join(chunk.text for chunk in chunks)
    assert joined.replace(" ", "").replace("\n", "") == polling.generator.reply.replace(
        " ", ""
    ).replace("\n", "")


async def test_markdown_reply_accepted(harness: Harness) -> None:
    await harness.start_adapter(parse_mode="markdown_v2")
    harness.generator.reply = "Try this: **breathe** (slowly) - 4.5 s in, `hold`, then out!"
    harness.server.enqueue_private_text("help", user=ALICE)

    [reply] = await harness.server.wait_for_messages(ALICE.id, 1)

    assert reply.parse_mode == "MarkdownV2"
    assert reply.plain_text == "Try this: breathe (slowly) - 4.5 s in, hold, then out!"


async def test_rejected_markdown_resent_plain(harness: Harness) -> None:
    await harness.start_adapter(parse_mode="markdown_v2")
    harness.server.fail_next(
        "sendMessage", bad_request("can't parse entities: character '.' is reserved")
    )
    harness.server.enqueue_private_text("hello", user=ALICE)

    [reply] = await harness.server.wait_for_messages(ALICE.id, 1)

    assert reply.parse_mode is None
    assert reply.text == "reply to: hello"


async def test_typing_indicator_and_its_failure(harness: Harness) -> None:
    await harness.start_adapter(typing_delay_s=0.1)
    server = harness.server
    server.fail_next("sendChatAction", server_error(500))
    harness.generator.delay_s = 0.4
    server.enqueue_private_text("first", user=ALICE)
    await server.wait_for_messages(ALICE.id, 1)
    server.enqueue_private_text("second", user=ALICE)
    await server.wait_for_messages(ALICE.id, 2)
    harness.generator.delay_s = 0.0
    server.enqueue_private_text("fast", user=ALICE)
    await server.wait_for_messages(ALICE.id, 3)

    # The first indicator failed, the second was sent, the fast reply needed none.
    assert [action.action for action in server.chat_actions] == ["typing"]
    attempts = [call for call in server.calls if call.method.lower() == "sendchataction"]
    assert len(attempts) == 2


# Failures of the Bot API


async def test_flood_control_retried_and_delivered_once(polling: Harness) -> None:
    server = polling.server
    server.fail_next("sendMessage", too_many_requests(1))
    server.enqueue_private_text("hello?", user=ALICE)

    [reply] = await server.wait_for_messages(ALICE.id, 1, timeout=10)
    await asyncio.sleep(0.3)

    assert reply.text == "reply to: hello?"
    assert len(server.sent_to(ALICE.id)) == 1
    attempts = [call for call in server.calls if call.method.lower() == "sendmessage"]
    assert [call.status for call in attempts] == [429, 200]


async def test_network_errors_retried(polling: Harness) -> None:
    server = polling.server
    server.fail_next("sendMessage", DropConnection(), server_error(502))
    server.enqueue_private_text("still there?", user=ALICE)

    [reply] = await server.wait_for_messages(ALICE.id, 1, timeout=10)

    assert reply.text == "reply to: still there?"
    assert len(server.sent_to(ALICE.id)) == 1


async def test_blocked_user_marked_unreachable(polling: Harness) -> None:
    server = polling.server
    server.block_chat(ALICE.id)
    server.enqueue_private_text("bye", user=ALICE)

    async def unreachable() -> bool:
        async with polling.service.engine.connect() as connection:
            value = await connection.scalar(
                select(User.unreachable_at).where(User.platform_user_id == str(ALICE.id))
            )
            return value is not None

    for _ in range(100):
        if await unreachable():
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)

    assert await unreachable()
    attempts = [call for call in server.calls if call.method.lower() == "sendmessage"]
    assert len(attempts) == 1
    assert [role for role, _, _ in await polling.user_turns(ALICE.id)] == ["user", "assistant"]


async def test_conflict_logged_and_polling_resumes(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.server.fail_next("getUpdates", conflict_terminated())
    with caplog.at_level(logging.ERROR, logger="bots.telegram_adapter"):
        await harness.start_adapter()
        harness.server.enqueue_private_text("after the conflict", user=ALICE)
        [reply] = await harness.server.wait_for_messages(ALICE.id, 1, timeout=10)

    assert "409 Conflict" in caplog.text
    assert reply.text == "reply to: after the conflict"


# Ordering


async def test_one_users_messages_answered_in_order(polling: Harness) -> None:
    server = polling.server
    polling.generator.delay_s = 0.1
    for text in ("one", "two", "three"):
        server.enqueue_private_text(text, user=ALICE)
    server.enqueue_private_text("other user", user=BO)

    replies = await server.wait_for_messages(ALICE.id, 3)
    await server.wait_for_messages(BO.id, 1)

    assert [reply.text for reply in replies] == [
        "reply to: one",
        "reply to: two",
        "reply to: three",
    ]
    order = [message.chat_id for message in server.sent]
    # Bo's message arrived last but was not held up behind Alice's queue.
    assert order.index(BO.id) < len(order) - 1


# Webhook mode


@pytest.fixture
async def webhook(harness: Harness) -> Harness:
    port = free_port()
    await harness.start_adapter(
        mode="webhook",
        webhook={
            "listen": "127.0.0.1",
            "port": port,
            "url_path": "tg",
            "public_url": f"http://127.0.0.1:{port}/tg",
        },
    )
    return harness


async def test_webhook_set_with_secret(webhook: Harness) -> None:
    config = webhook.server.webhook

    assert config is not None
    assert config.secret_token == "s3cret-token"
    assert config.url.endswith("/tg")


async def test_webhook_answers_messages(webhook: Harness) -> None:
    webhook.server.enqueue_private_text("via webhook", user=ALICE)

    [reply] = await webhook.server.wait_for_messages(ALICE.id, 1)

    assert reply.text == "reply to: via webhook"
    assert webhook.server.deliveries[0].status == 200


async def test_webhook_wrong_secret_rejected(webhook: Harness) -> None:
    update = {
        "update_id": 999,
        "message": {
            "message_id": 1,
            "date": 1_700_000_000,
            "chat": {"id": ALICE.id, "type": "private", "first_name": "Alice"},
            "from": ALICE.to_dict(),
            "text": "sneaky",
        },
    }

    wrong = await webhook.server.post_raw_update(update, secret_token="wrong")
    missing = await webhook.server.post_raw_update(update, secret_token=None)
    await asyncio.sleep(0.3)

    assert wrong == 403
    assert missing == 403
    assert await webhook.all_turn_count() == 0


async def test_webhook_acknowledges_before_slow_reply(webhook: Harness) -> None:
    webhook.generator.delay_s = 1.0
    webhook.server.enqueue_private_text("slow one", user=ALICE)

    [delivery] = await webhook.server.wait_for_deliveries(1)
    assert delivery.status == 200
    assert webhook.server.sent_to(ALICE.id) == []

    [reply] = await webhook.server.wait_for_messages(ALICE.id, 1)
    assert reply.text == "reply to: slow one"
    assert len(webhook.server.deliveries) == 1


async def test_redelivered_update_answered_once(webhook: Harness) -> None:
    update = webhook.server.enqueue_private_text("only once", user=ALICE)
    await webhook.server.wait_for_messages(ALICE.id, 1)

    status = await webhook.server.post_raw_update(update, secret_token="s3cret-token")
    await asyncio.sleep(0.5)

    assert status == 200
    assert len(webhook.server.sent_to(ALICE.id)) == 1
    assert len(await webhook.user_turns(ALICE.id)) == 2


# Streaming


async def test_streaming_edits_show_reply(harness: Harness) -> None:
    await harness.start_adapter(stream_edits=True, stream_edit_interval_s=1.0)
    harness.generator.reply = " ".join(f"word{index}" for index in range(30))
    harness.generator.stream_delay_s = 0.08
    harness.server.enqueue_private_text("stream please", user=ALICE)

    await harness.server.wait_for_messages(ALICE.id, 1)
    await harness.server.wait_for(
        lambda: harness.server.sent_to(ALICE.id)[0].text == harness.generator.reply,
        timeout=10,
        description="the streamed message to show the whole reply",
    )

    edits = [call for call in harness.server.calls if call.method.lower() == "editmessagetext"]
    assert 1 <= len(edits) <= 4
    assert len(harness.server.sent_to(ALICE.id)) == 1


async def test_timeout_replaces_streamed_part(tmp_path: Path) -> None:
    generator = FakeGenerator()
    generator.reply = " ".join(f"word{index}" for index in range(40))
    generator.stream_delay_s = 0.1
    settings = Settings(
        database=DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'cut.db'}"),
        generator={"timeout_s": 2.5},
    )
    async with TelegramStandin() as server:
        async with Service(settings, Secrets(), generator=generator) as service:
            harness = Harness(server, service, generator)
            await harness.start_adapter(stream_edits=True, stream_edit_interval_s=1.0)
            try:
                server.enqueue_private_text("tell me a long story", user=ALICE)
                await server.wait_for(
                    lambda: any(
                        message.text.startswith("I'm sorry") for message in server.sent_to(ALICE.id)
                    ),
                    timeout=15,
                    description="the apology",
                )
            finally:
                await harness.adapter.stop()
            edits = [call for call in server.calls if call.method.lower() == "editmessagetext"]

    # Part of the reply was shown, then the same message was edited into the apology.
    assert edits
    sent = server.sent_to(ALICE.id)
    assert len(sent) == 1
    assert sent[0].text.startswith("I'm sorry")
    assert "word0" not in sent[0].text


async def test_two_pollers_answer_each_message_once(harness: Harness) -> None:
    first = await harness.start_adapter()
    second = TelegramAdapter(
        manager=harness.service.manager,
        settings=TelegramSettings(api_base_url=harness.server.url, poll_timeout_s=1),
        token=harness.server.token,
    )
    await second.start()
    try:
        for index in range(6):
            harness.server.enqueue_private_text(f"message {index}", user=ALICE)
        replies = await harness.server.wait_for_messages(ALICE.id, 6, timeout=30)
        await asyncio.sleep(1.5)
    finally:
        await second.stop()

    assert first.state.value == "running"
    assert [reply.text for reply in replies] == [f"reply to: message {index}" for index in range(6)]
    assert len(harness.server.sent_to(ALICE.id)) == 6
    conflicts = [call for call in harness.server.calls if call.status == 409]
    assert conflicts, "the stand-in should have turned one poller away"
