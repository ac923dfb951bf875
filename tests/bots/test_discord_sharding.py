"""Discord sharding: two adapters, shards 0 and 1 of 2, split the traffic as Discord does."""

from __future__ import annotations

from pathlib import Path

import pytest

from bots.discord_adapter import DiscordAdapter
from core.config import DatabaseSettings, DiscordSettings, Secrets, Settings
from core.service import Service
from tests.helpers.discord_standin import (
    DEFAULT_GUILD_ID,
    DEFAULT_USER,
    SUPPORT_CHANNEL_ID,
    DiscordStandin,
    redirect_discord_py,
)
from tests.helpers.fakes import FakeGenerator

# Discord routes a guild's events to shard (guild_id >> 22) % shard_count.
GUILD_SHARD = (DEFAULT_GUILD_ID >> 22) % 2


async def test_two_shards_split_guild_and_direct_messages(tmp_path: Path) -> None:
    settings = Settings(database=DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'dc.db'}"))
    async with DiscordStandin(heartbeat_interval_ms=500) as server:
        with redirect_discord_py(server):
            async with Service(settings, Secrets(), generator=FakeGenerator()) as service:
                adapters = [
                    DiscordAdapter(
                        manager=service.manager,
                        settings=DiscordSettings(
                            support_channel_ids=[SUPPORT_CHANNEL_ID],
                            guild_ready_timeout_s=0.05,
                            shard_id=shard,
                            shard_count=2,
                        ),
                        token=server.token,
                    )
                    for shard in (0, 1)
                ]
                for adapter in adapters:
                    await adapter.start()
                try:
                    guilds = [[g.id for g in adapter.client.guilds] for adapter in adapters]
                    bot_id = adapters[0].client.user.id
                    dm = server.create_dm_channel(DEFAULT_USER)
                    await server.send_message_create(SUPPORT_CHANNEL_ID, DEFAULT_USER, "hello")
                    await server.send_message_create(dm.id, DEFAULT_USER, "are you there")
                    for channel_id in (SUPPORT_CHANNEL_ID, dm.id):
                        await server.wait_for(
                            lambda c=channel_id: any(
                                m.author.id == bot_id for m in server.messages_in(c)
                            ),
                            timeout=10,
                            description=f"a reply in {channel_id}",
                        )
                    replies = {
                        channel_id: [
                            m.content
                            for m in server.messages_in(channel_id)
                            if m.author.id == bot_id
                        ]
                        for channel_id in (SUPPORT_CHANNEL_ID, dm.id)
                    }
                finally:
                    for adapter in adapters:
                        await adapter.stop()

    # Only the guild's shard receives the guild.
    assert guilds[GUILD_SHARD] == [DEFAULT_GUILD_ID]
    assert guilds[1 - GUILD_SHARD] == []
    # Each message gets one reply, not one per process.
    assert replies[SUPPORT_CHANNEL_ID] == ["reply to: hello"]
    assert replies[dm.id] == ["reply to: are you there"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"shard_id": 0}, "set both shard_id and shard_count"),
        ({"shard_id": 2, "shard_count": 2}, "must be below shard_count"),
    ],
)
def test_shard_settings_checked(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DiscordSettings(**options)
