"""Batching never delays a request: an idle lane dispatches at once (no coalescing window), and only
requests that arrive while a batch runs are coalesced into the next one. Asserted on the batcher's
own counters, not on timing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from app.inference.local import make_engine
from app.settings import get_settings
from ml.inference.engine import Engine, EngineConfig
from ml.inference.types import ModelRef
from tests.inference.conftest import Artifacts


@pytest.fixture
def idle_engine() -> Iterator[Engine]:
    eng = make_engine(get_settings(), EngineConfig(max_batch_size=16, max_adapters=4, max_bases=1))
    yield eng
    eng.close()


def _wait_until(check: object, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_lone_request_is_dispatched_at_once(idle_engine: Engine, arts: Artifacts) -> None:
    assert idle_engine.config.max_wait_ms == 0  # the default: no window

    async def one() -> None:
        meta = await idle_engine.meta(ModelRef(name="a", storage_key=arts.cls_a, task="classification"))
        await idle_engine.predict(meta, await idle_engine.encode(meta, ["a lone request"]))

    asyncio.run(one())
    stats = idle_engine.lane_stats()
    assert (stats.batches, stats.items, stats.immediate, stats.waited) == (1, 1, 1, 0)


def test_requests_arriving_while_a_batch_runs_go_together_next(idle_engine: Engine, arts: Artifacts) -> None:
    release = threading.Event()
    ref = ModelRef(name="a", storage_key=arts.cls_a, task="classification")

    async def scenario() -> None:
        meta = await idle_engine.meta(ref)
        await idle_engine.predict(meta, await idle_engine.encode(meta, ["load the adapter"]))
        busy = idle_engine._model_thread.submit(release.wait)  # the model thread is busy
        rows = await idle_engine.encode(meta, ["first"])
        first = asyncio.ensure_future(idle_engine.predict(meta, rows))
        await asyncio.to_thread(_wait_until, lambda: idle_engine.lane_stats().batches == 2)  # dispatched
        later = [asyncio.ensure_future(idle_engine.predict(meta, rows)) for _ in range(3)]
        lane = next(iter(idle_engine._lanes.values()))
        await asyncio.to_thread(_wait_until, lambda: lane.queue.qsize() == 3)  # queued behind the batch
        release.set()
        await asyncio.gather(first, *later)
        busy.result()

    asyncio.run(scenario())
    stats = idle_engine.lane_stats()
    assert (stats.batches, stats.immediate, stats.waited, stats.coalesced) == (3, 3, 0, 2)
    assert [b.size for b in idle_engine.batches] == [1, 1, 3]
