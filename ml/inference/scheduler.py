"""Continuous batching for generation (iteration-level scheduling, as in Orca / vLLM).

A `GenLane` (one per lane: a base + adapter family, or one full model) keeps running batches
(`generation.RunningBatch`) on the single model thread and hands that thread one *hop* at a time:
the requests queued since the last hop are prefilled and join, then every running row takes a
decode step, and further steps for as long as nothing else waits (the engine's `_gen_hop`). A
request that arrives mid-generation waits at most one step instead of the whole batch; finished or
cancelled rows leave at once and free their slot. At most `max_rows` rows run per lane, the rest
wait in arrival order. A hop yields the model thread as soon as other work is queued on it, so the
lane's steps interleave with other lanes and with prediction batches.

An idle lane dispatches its first request at once; only `max_wait_s > 0` (the engine's opt-in
coalescing window) makes it wait for more before the first prefill."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor

from ml.inference.batcher import GenerateItem, LaneStats
from ml.inference.generation import RunningBatch

# (lane, newcomers) -> the newcomers that could not join yet; runs on the model thread
Hop = Callable[["GenLane", list[GenerateItem]], list[GenerateItem]]


class GenLane:
    def __init__(self, key: Hashable, hop: Hop, executor: Executor, max_rows: int, max_wait_s: float = 0.0) -> None:
        self.key = key
        self.queue: asyncio.Queue[GenerateItem] = asyncio.Queue()
        self.waiting: deque[GenerateItem] = deque()
        self.batches: dict[Hashable, RunningBatch] = {}  # the hop's to change; read here between hops
        self.stats = LaneStats()
        self._hop = hop
        self._executor = executor
        self._max_rows = max(1, max_rows)
        self._max_wait = max(0.0, max_wait_s)
        self.task = asyncio.get_running_loop().create_task(self._serve(), name=f"gen-lane-{key}")

    @property
    def running(self) -> int:
        return sum(len(b) for b in self.batches.values())

    def nothing_to_admit(self) -> bool:
        """No newcomer that could join now (read by the hop between its steps)."""
        return self.queue.empty() and not (self.waiting and self.running < self._max_rows)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waited = False
            if not self.running and not self.waiting:
                self.waiting.append(await self.queue.get())
                waited = await self._coalesce(loop)
            self._drain()
            admit = self._admit(waited)
            if not admit and not self.running:
                continue
            try:
                deferred = await loop.run_in_executor(self._executor, self._hop, self, admit)
            except Exception as exc:  # the hop settles rows itself; this is a last resort
                self._fail(admit, exc)
                continue
            self.waiting.extendleft(reversed(deferred))

    async def _coalesce(self, loop: asyncio.AbstractEventLoop) -> bool:
        """The opt-in window: an idle lane waits up to `max_wait_s` for more requests."""
        if self._max_wait <= 0:
            return False
        deadline = loop.time() + self._max_wait
        while len(self.waiting) < self._max_rows and (remaining := deadline - loop.time()) > 0:
            try:
                self.waiting.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return True

    def _drain(self) -> None:
        while not self.queue.empty():
            self.waiting.append(self.queue.get_nowait())
        if any(i.cancelled.is_set() for i in self.waiting):  # their callers went away
            self.waiting = deque(i for i in self.waiting if not i.cancelled.is_set())

    def _admit(self, waited: bool) -> list[GenerateItem]:
        room = self._max_rows - self.running
        admit = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        if admit:
            self.stats.batches += 1
            self.stats.items += len(admit)
            self.stats.coalesced += len(admit) - 1
            if waited:
                self.stats.waited += 1
            else:
                self.stats.immediate += 1
        return admit

    def _fail(self, admit: list[GenerateItem], exc: Exception) -> None:
        owners = [row.owner for b in self.batches.values() for row in b.rows]
        self.batches.clear()
        for item in [*admit, *owners]:
            if isinstance(item, GenerateItem):
                with contextlib.suppress(Exception):  # the lane must outlive any one caller
                    item.deliver(exc)
