"""Dynamic batching: one asyncio queue per lane (a base + adapter family, or one full model) and
a batcher task that collects up to `max_batch_size` items or waits `max_wait_ms` after the
first, then runs the batch on the single model thread."""

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


class Lane:
    def __init__(self, key: Hashable, run: Callable[[list[Item]], None], executor: Executor,
                 max_batch: int, max_wait_s: float) -> None:
        self.key = key
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
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
        deadline = loop.time() + self._max_wait
        while len(batch) < self._max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return batch
