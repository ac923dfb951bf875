"""The runner's shutdown sequence and its count of handlers in flight, with stand-in adapters."""

from __future__ import annotations

import asyncio

from bots.lifecycle import InFlight
from bots.runner import run_until_stopped


class RecordingAdapter:
    def __init__(self, name: str, events: list[str], *, cancelled: int = 0) -> None:
        self.name = name
        self.events = events
        self.cancelled = cancelled
        self.grace_s: float | None = None

    async def start(self) -> None:
        self.events.append(f"{self.name} start")

    async def stop_intake(self) -> None:
        self.events.append(f"{self.name} stop_intake")

    async def drain(self, timeout_s: float) -> int:
        self.grace_s = timeout_s
        self.events.append(f"{self.name} drain")
        if self.cancelled < 0:
            raise RuntimeError("drain failed")
        return self.cancelled

    async def stop(self) -> None:
        self.events.append(f"{self.name} stop")


async def test_stop_intake_everywhere_before_draining() -> None:
    events: list[str] = []
    adapters = [RecordingAdapter("a", events), RecordingAdapter("b", events, cancelled=-1)]
    stop = asyncio.Event()
    stop.set()

    await run_until_stopped(adapters, stop, grace_s=7)

    assert events == [
        "a start",
        "b start",
        "a stop_intake",
        "b stop_intake",
        "a drain",
        "b drain",
        "b stop",
        "a stop",
    ]
    assert [adapter.grace_s for adapter in adapters] == [7, 7]


async def test_in_flight_finish_waits_then_cancels() -> None:
    in_flight = InFlight()
    release = asyncio.Event()
    finished: list[str] = []

    async def handler(name: str, wait_for: asyncio.Event) -> None:
        with in_flight.track():
            await wait_for.wait()
            finished.append(name)

    quick = asyncio.create_task(handler("quick", release))
    slow = asyncio.create_task(handler("slow", asyncio.Event()))
    await asyncio.sleep(0)
    assert len(in_flight) == 2

    asyncio.get_running_loop().call_later(0.05, release.set)
    cancelled = await in_flight.finish(0.3)

    assert cancelled == 1
    assert finished == ["quick"]
    assert quick.done()
    assert not quick.cancelled()
    assert slow.cancelled()
    assert len(in_flight) == 0
