"""The Discord stand-in, driven by discord.py's real Client over REST and the gateway.

Raw aiohttp clients check the protocol details that discord.py hides: close
codes, frame compression and the REST error bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import discord
import pytest
from discord import app_commands

from tests.helpers.discord_standin import (
    DEFAULT_BOT,
    DEFAULT_GUILD_ID,
    DEFAULT_MODERATOR,
    DEFAULT_USER,
    GENERAL_CHANNEL_ID,
    GUILD_OWNER,
    INTENT_GUILD_MEMBERS,
    INTENT_MESSAGE_CONTENT,
    MODERATOR_ROLE_ID,
    SUPPORT_CHANNEL_ID,
    ApiError,
    DiscordStandin,
    redirect_discord_py,
)

# A short heartbeat interval, so that heartbeats happen within a test.
HEARTBEAT_INTERVAL_MS = 100
MESSAGES_ROUTE = "POST /channels/{channel_id}/messages"
Z_SYNC_FLUSH_SUFFIX = b"\x00\x00\xff\xff"


@pytest.fixture
async def server() -> AsyncIterator[DiscordStandin]:
    async with DiscordStandin(heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS) as running:
        with redirect_discord_py(running):
            yield running


def make_intents(*, message_content: bool = True) -> discord.Intents:
    intents = discord.Intents.default()
    intents.message_content = message_content
    return intents


def make_client(*, message_content: bool = True) -> discord.Client:
    # guild_ready_timeout is how long discord.py waits for more GUILD_CREATEs before on_ready.
    return discord.Client(
        intents=make_intents(message_content=message_content), guild_ready_timeout=0.05
    )


@contextlib.asynccontextmanager
async def running(client: discord.Client, server: DiscordStandin) -> AsyncIterator[discord.Client]:
    """Log ``client`` in, connect it, wait for on_ready, and close it on exit."""
    await client.login(server.token)
    task = asyncio.create_task(client.connect())
    try:
        await asyncio.wait_for(client.wait_until_ready(), timeout=5)
        yield client
    finally:
        await client.close()
        with contextlib.suppress(asyncio.CancelledError, discord.ConnectionClosed):
            await asyncio.wait_for(task, timeout=5)


def collect_messages(client: discord.Client) -> asyncio.Queue[discord.Message]:
    messages: asyncio.Queue[discord.Message] = asyncio.Queue()

    @client.event
    async def on_message(message: discord.Message) -> None:
        if message.author.id != client.user.id:  # type: ignore[union-attr]
            messages.put_nowait(message)

    return messages


# Login, READY, GUILD_CREATE and heartbeats


async def test_client_connects_over_zlib_stream(server: DiscordStandin) -> None:
    client = make_client()
    async with running(client, server):
        guild = client.get_guild(DEFAULT_GUILD_ID)
        assert guild is not None
        assert guild.name == "MindHarbor Test Guild"
        assert {channel.name for channel in guild.text_channels} == {"general", "support"}
        assert [thread.name for thread in guild.threads] == ["check-in"]
        assert guild.me is not None
        assert guild.me.id == DEFAULT_BOT.id
        assert guild.get_role(MODERATOR_ROLE_ID) is not None
        assert client.user is not None
        assert client.user.bot
        assert client.application_id == DEFAULT_BOT.id
        assert client.application_flags.gateway_message_content_limited

    connection = server.gateway_connections[0]
    assert connection.path == "/gateway"
    assert connection.compress == "zlib-stream"
    assert connection.query["v"] == "10"
    assert connection.query["encoding"] == "json"
    assert server.identify is not None
    assert server.identify["intents"] == make_intents().value
    routes = [call.route for call in server.calls]
    assert routes[:2] == ["GET /users/@me", "GET /oauth2/applications/@me"]
    assert connection.closed_by == "client"
    assert not server.connected.is_set()


async def test_heartbeats_are_acknowledged(server: DiscordStandin) -> None:
    client = make_client()
    async with running(client, server):
        await server.wait_for(
            lambda: server.heartbeat_acks >= 3, description="three heartbeat ACKs"
        )
        assert math.isfinite(client.latency)
        # After READY, heartbeats carry the latest sequence number.
        assert server.heartbeats[-1] is not None


async def test_guild_members_without_presences_intent(server: DiscordStandin) -> None:
    client = make_client()
    async with running(client, server):
        guild = client.get_guild(DEFAULT_GUILD_ID)
        assert guild is not None
        # Without GUILD_PRESENCES, GUILD_CREATE lists only the bot.
        assert [member.id for member in guild.members] == [DEFAULT_BOT.id]
        assert guild.member_count == 4


async def test_members_intent_gets_member_chunks() -> None:
    allowed = INTENT_MESSAGE_CONTENT | INTENT_GUILD_MEMBERS
    async with DiscordStandin(intents_allowed=allowed) as server:
        with redirect_discord_py(server):
            intents = make_intents()
            intents.members = True
            client = discord.Client(intents=intents, guild_ready_timeout=0.05)
            async with running(client, server):
                guild = client.get_guild(DEFAULT_GUILD_ID)
                assert guild is not None
                member_ids = {member.id for member in guild.members}

    # discord.py requests the member list (op 8) because GUILD_CREATE listed only the bot.
    assert int(server.member_requests[0]["guild_id"]) == DEFAULT_GUILD_ID
    assert member_ids == {GUILD_OWNER.id, DEFAULT_USER.id, DEFAULT_MODERATOR.id, DEFAULT_BOT.id}


# MESSAGE_CREATE and the MESSAGE_CONTENT intent


async def test_message_create_with_content_intent(server: DiscordStandin) -> None:
    client = make_client()
    messages = collect_messages(client)
    async with running(client, server):
        await server.send_message_create(GENERAL_CHANNEL_ID, DEFAULT_USER, "I feel anxious today")
        message = await asyncio.wait_for(messages.get(), timeout=5)

    assert message.content == "I feel anxious today"
    assert message.author.id == DEFAULT_USER.id
    assert isinstance(message.author, discord.Member)
    assert message.guild is not None
    assert message.guild.id == DEFAULT_GUILD_ID
    assert message.channel.id == GENERAL_CHANNEL_ID


async def test_message_content_emptied_without_intent(server: DiscordStandin) -> None:
    client = make_client(message_content=False)
    messages = collect_messages(client)
    async with running(client, server):
        await server.send_message_create(
            GENERAL_CHANNEL_ID,
            DEFAULT_USER,
            "plain guild message",
            embeds=[{"title": "an embed", "type": "rich"}],
        )
        plain = await asyncio.wait_for(messages.get(), timeout=5)
        await server.send_message_create(
            GENERAL_CHANNEL_ID, DEFAULT_USER, f"{DEFAULT_BOT.mention} are you there?"
        )
        mentioning = await asyncio.wait_for(messages.get(), timeout=5)
        dm = server.create_dm_channel(DEFAULT_USER)
        await server.send_message_create(dm.id, DEFAULT_USER, "a direct message")
        direct = await asyncio.wait_for(messages.get(), timeout=5)

    assert plain.content == ""
    assert plain.embeds == []
    assert mentioning.content == f"{DEFAULT_BOT.mention} are you there?"
    assert direct.content == "a direct message"
    assert isinstance(direct.channel, discord.DMChannel)
    # The stand-in keeps what the user wrote, whatever the bot may see.
    assert server.incoming[0]["content"] == "plain guild message"


async def test_disallowed_intent_raises_privileged_intents_required() -> None:
    async with DiscordStandin(intents_allowed=0) as server:
        with redirect_discord_py(server):
            client = make_client(message_content=True)
            try:
                with pytest.raises(discord.PrivilegedIntentsRequired):
                    await asyncio.wait_for(client.start(server.token), timeout=5)
            finally:
                await client.close()

    assert server.gateway_connections[0].close_code == 4014
    assert not server.application_flags & (1 << 18 | 1 << 19)


async def test_bot_receives_its_own_messages(server: DiscordStandin) -> None:
    client = make_client(message_content=False)
    own: asyncio.Queue[discord.Message] = asyncio.Queue()

    @client.event
    async def on_message(message: discord.Message) -> None:
        own.put_nowait(message)

    async with running(client, server):
        channel = client.get_channel(GENERAL_CHANNEL_ID)
        assert isinstance(channel, discord.TextChannel)
        await channel.send("a reply from the bot")
        echoed = await asyncio.wait_for(own.get(), timeout=5)

    # An app gets the content of its own messages without MESSAGE_CONTENT.
    assert echoed.author.id == DEFAULT_BOT.id
    assert echoed.content == "a reply from the bot"


# Sending messages: limits, rate limits, mentions, typing


async def test_send_over_content_limit_raises_http_exception(server: DiscordStandin) -> None:
    client = make_client()
    async with running(client, server):
        channel = client.get_channel(GENERAL_CHANNEL_ID)
        assert isinstance(channel, discord.TextChannel)
        with pytest.raises(discord.HTTPException) as raised:
            await channel.send("x" * 2001)
        await channel.send("y" * 2000)

    assert raised.value.status == 400
    assert raised.value.code == 50035
    assert "Must be 2000 or fewer in length" in raised.value.text
    assert [len(message.content) for message in server.messages] == [2000]


async def test_rate_limit_is_waited_out(server: DiscordStandin) -> None:
    client = make_client()
    server.rate_limit_next(MESSAGES_ROUTE, retry_after=0.3)
    async with running(client, server):
        channel = client.get_channel(GENERAL_CHANNEL_ID)
        assert isinstance(channel, discord.TextChannel)
        sent = await channel.send("after the rate limit")

    calls = server.calls_to(MESSAGES_ROUTE)
    assert [call.status for call in calls] == [429, 200]
    assert calls[1].at - calls[0].at >= 0.3
    assert sent.content == "after the rate limit"
    assert [message.content for message in server.messages] == ["after the rate limit"]


async def test_scripted_error_reaches_the_client(server: DiscordStandin) -> None:
    client = make_client()
    server.fail_next(
        MESSAGES_ROUTE, ApiError(403, 50013, "You lack permissions to perform that action")
    )
    async with running(client, server):
        channel = client.get_channel(GENERAL_CHANNEL_ID)
        assert isinstance(channel, discord.TextChannel)
        with pytest.raises(discord.Forbidden) as raised:
            await channel.send("blocked")
        await channel.send("allowed")

    assert raised.value.code == 50013
    assert [call.status for call in server.calls_to(MESSAGES_ROUTE)] == [403, 200]
    assert [message.content for message in server.messages] == ["allowed"]


async def test_allowed_mentions_decide_pings(server: DiscordStandin) -> None:
    client = make_client()
    text = f"@everyone {DEFAULT_USER.mention} <@&{MODERATOR_ROLE_ID}>"
    async with running(client, server):
        channel = client.get_channel(GENERAL_CHANNEL_ID)
        assert isinstance(channel, discord.TextChannel)
        await channel.send(text, allowed_mentions=discord.AllowedMentions.none())
        await channel.send(text)

    silenced, default = server.messages
    assert silenced.allowed_mentions == {"parse": []}
    assert not silenced.pings.any
    # By default users and the mentionable role are pinged; @everyone needs MENTION_EVERYONE.
    assert default.allowed_mentions is None
    assert default.pings.users == {DEFAULT_USER.id}
    assert default.pings.roles == {MODERATOR_ROLE_ID}
    assert not default.pings.everyone


async def test_typing_and_reply_are_recorded(server: DiscordStandin) -> None:
    client = make_client()
    messages = collect_messages(client)
    async with running(client, server):
        await server.send_message_create(SUPPORT_CHANNEL_ID, DEFAULT_USER, "hello?")
        incoming = await asyncio.wait_for(messages.get(), timeout=5)
        async with incoming.channel.typing():
            await server.wait_for_typing(SUPPORT_CHANNEL_ID)
        await incoming.reply("hi, I am here", mention_author=False)
        sent = await server.wait_for_messages(SUPPORT_CHANNEL_ID)

    assert server.typing[0] == SUPPORT_CHANNEL_ID
    assert sent[0].message_reference is not None
    assert sent[0].message_reference["message_id"] == str(incoming.id)
    assert sent[0].pings.users == frozenset()


# Application commands and interactions


def make_tree(client: discord.Client) -> app_commands.CommandTree[discord.Client]:
    return app_commands.CommandTree(client)


async def test_slash_command_defer_then_followup(server: DiscordStandin) -> None:
    client = make_client()
    tree = make_tree(client)

    @tree.command(name="talk", description="Talk to MindHarbor")
    async def talk(interaction: discord.Interaction, text: str) -> None:
        await interaction.response.defer()
        await interaction.followup.send(f"You said: {text}")

    async with running(client, server):
        await tree.sync()
        record = await server.send_interaction_create(
            GENERAL_CHANNEL_ID, DEFAULT_USER, "talk", options={"text": "hello"}
        )
        responses = await server.wait_for_interaction_responses(record.id, count=2)

    callback, followup = responses
    assert callback.kind == "callback"
    assert callback.callback_type == 5
    assert callback.status == 200
    assert followup.kind == "followup"
    assert followup.data is not None
    assert followup.data["content"] == "You said: hello"
    # A followup right after a deferred response edits the loading message.
    assert followup.message_id == record.original_message_id
    (message,) = server.messages
    assert message.content == "You said: hello"
    assert message.source == "interaction_response"
    assert not message.loading
    assert record.payload["member"]["user"]["id"] == str(DEFAULT_USER.id)
    assert record.payload["data"]["options"] == [{"name": "text", "type": 3, "value": "hello"}]


async def test_slash_command_in_dm_sends_message(server: DiscordStandin) -> None:
    client = make_client()
    tree = make_tree(client)
    seen: asyncio.Future[discord.Interaction] = asyncio.get_running_loop().create_future()

    @tree.command(name="checkin", description="Start a check-in")
    async def checkin(interaction: discord.Interaction) -> None:
        seen.set_result(interaction)
        await interaction.response.send_message("How are you feeling?", ephemeral=True)

    async with running(client, server):
        await tree.sync()
        dm = server.create_dm_channel(DEFAULT_USER)
        record = await server.send_interaction_create(dm.id, DEFAULT_USER, "checkin")
        await server.wait_for_interaction_responses(record.id)
        interaction = await asyncio.wait_for(seen, timeout=5)

    assert interaction.guild_id is None
    assert interaction.user.id == DEFAULT_USER.id
    assert "user" in record.payload
    assert "member" not in record.payload
    (message,) = server.messages_in(dm.id)
    assert message.content == "How are you feeling?"
    assert message.ephemeral
    assert server.interaction_responses[0].callback_type == 4


async def test_member_option_is_resolved(server: DiscordStandin) -> None:
    client = make_client()
    tree = make_tree(client)
    chosen: asyncio.Future[discord.Member] = asyncio.get_running_loop().create_future()

    @tree.command(name="escalate", description="Hand the conversation to a moderator")
    async def escalate(interaction: discord.Interaction, moderator: discord.Member) -> None:
        chosen.set_result(moderator)
        await interaction.response.send_message(f"Handing over to {moderator.mention}")
        await interaction.edit_original_response(content="A moderator will join soon.")

    async with running(client, server):
        await tree.sync()
        record = await server.send_interaction_create(
            GENERAL_CHANNEL_ID, DEFAULT_USER, "escalate", options={"moderator": DEFAULT_MODERATOR}
        )
        moderator = await asyncio.wait_for(chosen, timeout=5)
        await server.wait_for_interaction_responses(record.id, count=2)

    assert isinstance(moderator, discord.Member)
    assert [role.id for role in moderator.roles if not role.is_default()] == [MODERATOR_ROLE_ID]
    assert record.payload["data"]["options"][0]["type"] == 6
    (message,) = server.messages
    assert message.content == "A moderator will join soon."
    assert [edit["content"] for edit in message.edits] == ["A moderator will join soon."]
    # Interaction responses ping users only by default.
    assert message.pings.users == {DEFAULT_MODERATOR.id}
    kinds = [response.kind for response in server.interaction_responses]
    assert kinds == ["callback", "edit_original"]


async def test_late_response_gets_unknown_interaction() -> None:
    async with DiscordStandin(interaction_response_deadline=0.2) as server:
        with redirect_discord_py(server):
            client = make_client()
            tree = make_tree(client)
            failure: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

            @tree.command(name="slow", description="Answers too late")
            async def slow(interaction: discord.Interaction) -> None:
                await asyncio.sleep(0.35)
                try:
                    await interaction.response.defer()
                except discord.HTTPException as error:
                    failure.set_result(error)

            async with running(client, server):
                await tree.sync()
                record = await server.send_interaction_create(
                    GENERAL_CHANNEL_ID, DEFAULT_USER, "slow"
                )
                error = await asyncio.wait_for(failure, timeout=5)

    assert isinstance(error, discord.NotFound)
    assert error.code == 10062
    (response,) = server.interaction_responses
    assert response.status == 404
    assert response.error_code == 10062
    assert not record.acknowledged


async def test_message_command_target_keeps_content(server: DiscordStandin) -> None:
    client = make_client(message_content=False)
    tree = make_tree(client)
    reported: asyncio.Future[discord.Message] = asyncio.get_running_loop().create_future()

    @tree.context_menu(name="Report message")
    async def report(interaction: discord.Interaction, message: discord.Message) -> None:
        reported.set_result(message)
        await interaction.response.send_message("Thanks, a moderator will look.", ephemeral=True)

    async with running(client, server):
        await tree.sync()
        target = await server.send_message_create(GENERAL_CHANNEL_ID, DEFAULT_USER, "I need help")
        await server.send_interaction_create(
            GENERAL_CHANNEL_ID,
            DEFAULT_MODERATOR,
            "Report message",
            command_type=3,
            target_id=int(target["id"]),
        )
        message = await asyncio.wait_for(reported, timeout=5)

    # The target of a message command keeps its content without MESSAGE_CONTENT.
    assert message.content == "I need help"
    assert message.id == int(target["id"])


async def test_tree_sync_records_localizations(server: DiscordStandin) -> None:
    class GermanTranslator(app_commands.Translator):
        async def translate(
            self,
            string: app_commands.locale_str,
            locale: discord.Locale,
            context: app_commands.TranslationContextTypes,
        ) -> str | None:
            german = {"talk": "reden", "Talk to MindHarbor": "Mit MindHarbor reden"}
            return german.get(string.message) if locale is discord.Locale.german else None

    client = make_client()
    tree = make_tree(client)

    @tree.command(name="talk", description="Talk to MindHarbor")
    async def talk(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("ok")

    async with running(client, server):
        await tree.set_translator(GermanTranslator())
        global_commands = await tree.sync()
        guild = discord.Object(id=DEFAULT_GUILD_ID)
        tree.copy_global_to(guild=guild)
        await tree.sync(guild=guild)

    (stored,) = server.commands[None]
    assert stored["name"] == "talk"
    assert stored["description"] == "Talk to MindHarbor"
    assert stored["name_localizations"] == {"de": "reden"}
    assert stored["description_localizations"] == {"de": "Mit MindHarbor reden"}
    assert global_commands[0].id == int(stored["id"])
    assert [command["name"] for command in server.commands[DEFAULT_GUILD_ID]] == ["talk"]
    assert server.commands[DEFAULT_GUILD_ID][0]["guild_id"] == str(DEFAULT_GUILD_ID)


# DMs and threads


async def test_dm_channel_creation(server: DiscordStandin) -> None:
    client = make_client()
    async with running(client, server):
        user = await client.fetch_user(DEFAULT_USER.id)
        dm = await user.create_dm()
        await dm.send("Hello from MindHarbor")
        again = await user.create_dm()

    assert server.dm_channels[DEFAULT_USER.id].id == dm.id
    assert again.id == dm.id
    assert [message.content for message in server.messages_in(dm.id)] == ["Hello from MindHarbor"]
    assert server.calls_to("POST /users/@me/channels")[0].body == {"recipient_id": DEFAULT_USER.id}


async def test_private_thread_creation(server: DiscordStandin) -> None:
    client = make_client()
    created: asyncio.Future[discord.Thread] = asyncio.get_running_loop().create_future()

    @client.event
    async def on_thread_create(thread: discord.Thread) -> None:
        created.set_result(thread)

    async with running(client, server):
        channel = client.get_channel(GENERAL_CHANNEL_ID)
        assert isinstance(channel, discord.TextChannel)
        thread = await channel.create_thread(
            name="Check-in with Alice", type=discord.ChannelType.private_thread, invitable=False
        )
        await thread.add_user(discord.Object(id=DEFAULT_USER.id))
        await thread.send("This space is just for you.")
        dispatched = await asyncio.wait_for(created, timeout=5)

    assert thread.type is discord.ChannelType.private_thread
    assert dispatched.id == thread.id
    (stored,) = server.threads
    assert stored.type == 12
    assert stored.parent_id == GENERAL_CHANNEL_ID
    assert not stored.invitable
    assert stored.member_ids == {DEFAULT_BOT.id, DEFAULT_USER.id}
    assert [message.content for message in server.messages_in(thread.id)] == [
        "This space is just for you."
    ]


async def test_thread_from_message_takes_its_id(server: DiscordStandin) -> None:
    client = make_client()
    messages = collect_messages(client)
    async with running(client, server):
        await server.send_message_create(GENERAL_CHANNEL_ID, DEFAULT_USER, "Can we talk privately?")
        incoming = await asyncio.wait_for(messages.get(), timeout=5)
        thread = await incoming.create_thread(name="Talk with Alice")
        with pytest.raises(discord.HTTPException) as raised:
            await incoming.create_thread(name="A second thread")

    assert thread.id == incoming.id
    assert thread.type is discord.ChannelType.public_thread
    assert raised.value.code == 160004


# Reconnecting


async def test_client_resumes_after_close(server: DiscordStandin) -> None:
    client = make_client()
    messages = collect_messages(client)
    resumed = asyncio.Event()

    @client.event
    async def on_resumed() -> None:
        resumed.set()

    async with running(client, server):
        await server.close_gateway(4000)
        # Sent while the session is detached: it waits in the session log for RESUME.
        await server.send_message_create(GENERAL_CHANNEL_ID, DEFAULT_USER, "are you still there?")
        await asyncio.wait_for(resumed.wait(), timeout=5)
        message = await asyncio.wait_for(messages.get(), timeout=5)

    assert message.content == "are you still there?"
    assert len(server.identifies) == 1
    assert len(server.resumes) == 1
    assert server.gateway_connections[1].path == "/resume-gateway"
    assert server.gateway_connections[1].resumed


async def test_client_resumes_after_reconnect_request(server: DiscordStandin) -> None:
    client = make_client()
    resumed = asyncio.Event()

    @client.event
    async def on_resumed() -> None:
        resumed.set()

    async with running(client, server):
        await server.send_reconnect()
        await asyncio.wait_for(resumed.wait(), timeout=5)

    assert len(server.identifies) == 1
    assert len(server.resumes) == 1


async def test_auto_sharded_client_requests_gateway_bot(server: DiscordStandin) -> None:
    client = discord.AutoShardedClient(intents=make_intents(), guild_ready_timeout=0.05)
    async with running(client, server):
        assert client.shard_count == 1
        assert client.get_guild(DEFAULT_GUILD_ID) is not None

    assert "GET /gateway/bot" in [call.route for call in server.calls]
    assert server.identify is not None
    assert server.identify["shard"] == [0, 1]


# The gateway protocol, with a raw websocket


async def receive_payload(
    ws: aiohttp.ClientWebSocketResponse, inflater: Any | None = None
) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.receive(), timeout=5)
    if message.type is aiohttp.WSMsgType.BINARY:
        assert inflater is not None
        assert message.data.endswith(Z_SYNC_FLUSH_SUFFIX)
        return json.loads(inflater.decompress(message.data))
    assert message.type is aiohttp.WSMsgType.TEXT, message
    return json.loads(message.data)


async def receive_close_code(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    while True:
        message = await asyncio.wait_for(ws.receive(), timeout=5)
        if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            return ws.close_code


def identify_payload(server: DiscordStandin, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "token": server.token,
        "intents": (1 << 0) | (1 << 9),
        "properties": {"os": "linux", "browser": "raw-test", "device": "raw-test"},
    }
    data.update(changes)
    return {"op": 2, "d": data}


async def test_gateway_hello_and_heartbeat_ack(server: DiscordStandin) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{server.gateway_url}?v=10&encoding=json") as ws,
    ):
        hello = await receive_payload(ws)
        await ws.send_json({"op": 1, "d": None})
        ack = await receive_payload(ws)

    assert hello == {
        "op": 10,
        "d": {"heartbeat_interval": HEARTBEAT_INTERVAL_MS},
        "s": None,
        "t": None,
    }
    assert ack["op"] == 11
    assert server.heartbeats == [None]


async def test_gateway_zlib_stream_shares_one_context(server: DiscordStandin) -> None:
    inflater = zlib.decompressobj()
    url = f"{server.gateway_url}?v=10&encoding=json&compress=zlib-stream"
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        hello = await receive_payload(ws, inflater)
        await ws.send_json(identify_payload(server))
        ready = await receive_payload(ws, inflater)
        guild_create = await receive_payload(ws, inflater)

    assert hello["op"] == 10
    assert ready["t"] == "READY"
    assert ready["s"] == 1
    assert ready["d"]["v"] == 10
    assert ready["d"]["user"]["bot"] is True
    assert ready["d"]["guilds"] == [{"id": str(DEFAULT_GUILD_ID), "unavailable": True}]
    assert ready["d"]["resume_gateway_url"] == server.resume_gateway_url
    assert ready["d"]["application"]["id"] == str(DEFAULT_BOT.id)
    assert guild_create["t"] == "GUILD_CREATE"
    assert guild_create["s"] == 2


@pytest.mark.parametrize(
    ("first_payload", "close_code"),
    [
        ({"op": 2, "d": {"token": "wrong", "intents": 1, "properties": {}}}, 4004),
        (
            {
                "op": 2,
                "d": {"token": None, "intents": INTENT_MESSAGE_CONTENT << 10, "properties": {}},
            },
            4004,
        ),
        ({"op": 99, "d": None}, 4001),
        ({"op": 3, "d": {"status": "online", "since": None, "activities": [], "afk": False}}, 4003),
        ({"not": "a payload"}, 4002),
    ],
)
async def test_gateway_rejects_bad_payloads(
    server: DiscordStandin, first_payload: dict[str, Any], close_code: int
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{server.gateway_url}?v=10&encoding=json") as ws,
    ):
        await receive_payload(ws)
        await ws.send_json(first_payload)
        assert await receive_close_code(ws) == close_code


@pytest.mark.parametrize(
    ("intents", "close_code"),
    [
        (INTENT_MESSAGE_CONTENT, None),
        # GUILD_MEMBERS is privileged and not allowed by default.
        (1 << 1, 4014),
        # Bit 18 is not a defined intent.
        (1 << 18, 4013),
    ],
)
async def test_identify_checks_intents(
    server: DiscordStandin, intents: int, close_code: int | None
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{server.gateway_url}?v=10&encoding=json") as ws,
    ):
        await receive_payload(ws)
        await ws.send_json(identify_payload(server, intents=intents))
        if close_code is None:
            ready = await receive_payload(ws)
            assert ready["t"] == "READY"
            await ws.send_json(identify_payload(server, intents=intents))
            # A second IDENTIFY on one connection is "Already authenticated".
            assert await receive_close_code(ws) == 4005
        else:
            assert await receive_close_code(ws) == close_code


async def test_gateway_rejects_unsupported_version_and_encoding(server: DiscordStandin) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as handshake:
            await session.ws_connect(f"{server.gateway_url}?v=10&encoding=etf")
        async with session.ws_connect(f"{server.gateway_url}?v=6&encoding=json") as ws:
            await receive_payload(ws)
            close_code = await receive_close_code(ws)

    assert handshake.value.status == 400
    assert close_code == 4012


async def test_resume_of_unknown_session_is_invalid(server: DiscordStandin) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{server.resume_gateway_url}?v=10&encoding=json") as ws,
    ):
        await receive_payload(ws)
        await ws.send_json({"op": 6, "d": {"token": server.token, "session_id": "gone", "seq": 3}})
        invalid = await receive_payload(ws)

    assert invalid["op"] == 9
    assert invalid["d"] is False


# REST errors and interaction callbacks, with raw HTTP


async def rest(
    server: DiscordStandin,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    authorized: bool = True,
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bot {server.token}"} if authorized else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, f"{server.api_base}{path}", json=json_body, headers=headers
        ) as response,
    ):
        body = await response.json() if response.content_length else None
        return response.status, body


@pytest.mark.parametrize(
    ("method", "path", "json_body", "authorized", "status", "code"),
    [
        ("GET", "/no/such/route", None, True, 404, 0),
        ("GET", "/users/@me", None, False, 401, 0),
        ("DELETE", "/users/@me", None, True, 405, 0),
        ("POST", f"/channels/{GENERAL_CHANNEL_ID}/messages", {}, True, 400, 50006),
        ("POST", "/channels/1/messages", {"content": "hi"}, True, 404, 10003),
    ],
)
async def test_rest_errors_have_discord_bodies(
    server: DiscordStandin,
    method: str,
    path: str,
    json_body: Any,
    authorized: bool,
    status: int,
    code: int,
) -> None:
    response_status, body = await rest(
        server, method, path, json_body=json_body, authorized=authorized
    )
    assert response_status == status
    assert body["code"] == code
    assert isinstance(body["message"], str)
    assert server.calls[-1].status == status


async def test_unknown_route_body_matches_discord(server: DiscordStandin) -> None:
    status, body = await rest(server, "GET", "/no/such/route")
    assert status == 404
    assert body == {"message": "404: Not Found", "code": 0}
    assert server.calls[-1].route is None


async def test_gateway_bot_and_application_routes(server: DiscordStandin) -> None:
    status, gateway = await rest(server, "GET", "/gateway", authorized=False)
    assert status == 200
    assert gateway == {"url": server.gateway_url}
    status, gateway_bot = await rest(server, "GET", "/gateway/bot")
    assert status == 200
    assert gateway_bot["url"] == server.gateway_url
    assert gateway_bot["shards"] == 1
    assert gateway_bot["session_start_limit"]["max_concurrency"] == 1
    status, application = await rest(server, "GET", "/oauth2/applications/@me")
    assert status == 200
    # MESSAGE_CONTENT is allowed by default and the app is unverified: the _LIMITED flag.
    assert application["flags"] & (1 << 19)
    assert not application["flags"] & (1 << 18)


@pytest.mark.parametrize(
    "command",
    [
        {"name": "Talk", "description": "Upper case", "type": 1},
        {"name": "talk now", "description": "A space", "type": 1},
        {"name": "talk", "description": ""},
        {"name": "talk", "description": "ok", "name_localizations": {"xx": "reden"}},
        {"name": "Report message", "description": "not empty", "type": 3},
    ],
)
async def test_invalid_commands_are_rejected(
    server: DiscordStandin, command: dict[str, Any]
) -> None:
    path = f"/applications/{DEFAULT_BOT.id}/commands"
    status, body = await rest(server, "PUT", path, json_body=[command])
    assert status == 400
    assert body["code"] == 50035
    assert "0" in body["errors"]
    assert server.commands == {}


async def test_second_callback_is_already_acknowledged(server: DiscordStandin) -> None:
    status, _ = await rest(
        server,
        "PUT",
        f"/applications/{DEFAULT_BOT.id}/commands",
        json_body=[{"name": "talk", "description": "Talk", "type": 1}],
    )
    assert status == 200
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{server.gateway_url}?v=10&encoding=json") as ws,
    ):
        await receive_payload(ws)
        await ws.send_json(identify_payload(server))
        await server.wait_until_connected()
        record = await server.send_interaction_create(GENERAL_CHANNEL_ID, DEFAULT_USER, "talk")
        callback = f"/interactions/{record.id}/{record.token}/callback"
        reply = {"type": 4, "data": {"content": "first"}}
        first = await rest(server, "POST", callback, json_body=reply, authorized=False)
        second = await rest(server, "POST", callback, json_body=reply, authorized=False)

    first_status, first_body = first
    second_status, second_body = second
    assert first_status == 204
    assert first_body is None
    assert second_status == 400
    assert second_body["code"] == 40060
    assert [response.status for response in server.interaction_responses] == [204, 400]
    assert [message.content for message in server.messages] == ["first"]


async def test_rest_message_content_follows_enabled_intents() -> None:
    async with DiscordStandin(intents_allowed=0) as server:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{server.gateway_url}?v=10&encoding=json") as ws,
        ):
            await receive_payload(ws)
            await ws.send_json(identify_payload(server))
            await server.wait_until_connected()
            plain = await server.send_message_create(
                GENERAL_CHANNEL_ID, DEFAULT_USER, "private words"
            )
            dm = server.create_dm_channel(DEFAULT_USER)
            direct = await server.send_message_create(dm.id, DEFAULT_USER, "direct words")
        _, fetched_plain = await rest(
            server, "GET", f"/channels/{GENERAL_CHANNEL_ID}/messages/{plain['id']}"
        )
        _, fetched_direct = await rest(server, "GET", f"/channels/{dm.id}/messages/{direct['id']}")

    # Without MESSAGE_CONTENT enabled, REST empties guild messages too, but not DMs.
    assert fetched_plain["content"] == ""
    assert fetched_direct["content"] == "direct words"


async def test_followup_needs_initial_response(server: DiscordStandin) -> None:
    status, _ = await rest(
        server,
        "PUT",
        f"/applications/{DEFAULT_BOT.id}/commands",
        json_body=[{"name": "talk", "description": "Talk", "type": 1}],
    )
    assert status == 200
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{server.gateway_url}?v=10&encoding=json") as ws,
    ):
        await receive_payload(ws)
        await ws.send_json(identify_payload(server))
        await server.wait_until_connected()
        record = await server.send_interaction_create(GENERAL_CHANNEL_ID, DEFAULT_USER, "talk")
        webhook = f"/webhooks/{DEFAULT_BOT.id}/{record.token}"
        early_status, early_body = await rest(
            server, "POST", webhook, json_body={"content": "too early"}, authorized=False
        )
        callback = f"/interactions/{record.id}/{record.token}/callback"
        await rest(
            server,
            "POST",
            callback,
            json_body={"type": 4, "data": {"content": "first"}},
            authorized=False,
        )
        followup_status, followup = await rest(
            server, "POST", webhook, json_body={"content": "second"}, authorized=False
        )

    assert early_status == 404
    assert early_body["code"] == 10015
    assert followup_status == 200
    assert followup["content"] == "second"
    assert record.followup_message_ids == [int(followup["id"])]
    assert [message.source for message in server.messages] == ["interaction_response", "followup"]
