"""`SingleFlight`: concurrent misses of one key share one lookup (its value or its exception), a waiter
that goes away does not cancel it for the others, and a later miss looks up again."""

from __future__ import annotations

import asyncio

import pytest

from app.kit.hotcache import SingleFlight


def test_concurrent_misses_share_one_lookup() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    calls: list[str] = []

    async def scenario() -> tuple[list[int], int]:
        gate = asyncio.Event()

        async def lookup() -> int:
            calls.append("k")
            await gate.wait()
            return 42

        tasks = [asyncio.create_task(flights.run("k", lookup)) for _ in range(10)]
        other = asyncio.create_task(flights.run("other", lookup))
        while len(calls) < 2:  # both keys' first callers are inside their lookups
            await asyncio.sleep(0)
        gate.set()
        values = list(await asyncio.gather(*tasks))
        await other
        return values, await flights.run("k", lookup)  # nothing in flight now: a fresh lookup

    values, again = asyncio.run(scenario())
    assert values == [42] * 10 and again == 42
    assert calls == ["k", "k", "k"]  # key "k" twice (the burst, then the later miss), "other" once


def test_waiters_get_the_lookups_error_and_a_cancelled_waiter_leaves_it_running() -> None:
    flights: SingleFlight[str, int] = SingleFlight()

    async def scenario() -> None:
        gate = asyncio.Event()

        async def failing() -> int:
            await gate.wait()
            raise LookupError("no such key")

        first = asyncio.create_task(flights.run("k", failing))
        await asyncio.sleep(0)
        waiters = [asyncio.create_task(flights.run("k", failing)) for _ in range(3)]
        await asyncio.sleep(0)
        waiters[0].cancel()
        gate.set()
        for task in (first, *waiters[1:]):
            with pytest.raises(LookupError):
                await task
        with pytest.raises(asyncio.CancelledError):
            await waiters[0]

    asyncio.run(scenario())
