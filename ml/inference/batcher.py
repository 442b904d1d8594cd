"""Dynamic batching: one asyncio queue per lane (a base + adapter family, or one full model) and
a batcher task that runs batches of up to `max_batch_size` items on the single model thread.

An idle lane dispatches its first item at once, with whatever else is already queued: batching never
delays a request. Items that arrive while a batch runs queue up and go together in the next one. Only
`max_wait_s > 0` (an opt-in coalescing window) makes a lane wait for more after the first item."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from ml.inference.loading import ModelMeta
from ml.inference.sampling import GenEvent, RowParams

Deliver = Callable[[Any], None]  # a result or an exception; safe to call from any thread


@dataclass
class PredictItem:
    meta: ModelMeta
    ids: list[int]
    top_k: int
    deliver: Deliver


@dataclass
class GenerateItem:
    meta: ModelMeta
    ids: list[int]
    params: RowParams
    sink: Callable[[GenEvent], None]
    deliver: Deliver  # only ever called with an exception
    cancelled: threading.Event = field(default_factory=threading.Event)


Item = PredictItem | GenerateItem


@dataclass
class LaneStats:
    """The batcher's own counters: `immediate` batches left without waiting for more items,
    `waited` ones waited out the coalescing window; `coalesced` items joined a batch already queued."""

    batches: int = 0
    items: int = 0
    immediate: int = 0
    waited: int = 0
    coalesced: int = 0


class Lane:
    def __init__(self, key: Hashable, run: Callable[[list[Item]], None], executor: Executor,
                 max_batch: int, max_wait_s: float = 0.0) -> None:
        self.key = key
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.stats = LaneStats()
        self._run = run
        self._executor = executor
        self._max_batch = max(1, max_batch)
        self._max_wait = max(0.0, max_wait_s)
        self.task = asyncio.get_running_loop().create_task(self._serve(), name=f"lane-{key}")

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect(loop)
            try:
                await loop.run_in_executor(self._executor, self._run, batch)
            except Exception as exc:  # _run settles items itself; this is a last resort
                for item in batch:
                    item.deliver(exc)

    async def _collect(self, loop: asyncio.AbstractEventLoop) -> list[Item]:
        batch = [await self.queue.get()]
        self._drain(batch)
        waited = False
        if self._max_wait > 0:
            deadline = loop.time() + self._max_wait
            while len(batch) < self._max_batch and (remaining := deadline - loop.time()) > 0:
                waited = True
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
                self._drain(batch)
        self.stats.batches += 1
        self.stats.items += len(batch)
        self.stats.coalesced += len(batch) - 1
        if waited:
            self.stats.waited += 1
        else:
            self.stats.immediate += 1
        return batch

    def _drain(self, batch: list[Item]) -> None:
        """What is already queued (it arrived while the previous batch ran) joins without waiting."""
        while len(batch) < self._max_batch and not self.queue.empty():
            batch.append(self.queue.get_nowait())
