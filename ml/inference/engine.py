"""The inference engine (a library): keeps models warm, batches concurrent requests per base and
runs every forward on one worker thread under `torch.inference_mode`. Predictions go in dynamic
batches (`batcher`); generation is continuously batched (`scheduler`): requests join a running
batch between decode steps and leave it as soon as they finish.

Threads: callers (any event loop) -> the engine's own event loop thread (lanes / batchers) ->
the single model thread. Tokenizing and reading model metadata happen in helper threads, so
request validation fails fast (before a stream starts) without waiting for the model thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ml.errors import InputError, MLError, ModelLoadError
from ml.inference import loading, predict
from ml.inference.batcher import GenerateItem, Item, Lane, LaneStats, PredictItem
from ml.inference.cache import AdapterEntry, FullEntry, ModelCache
from ml.inference.generation import GenRow, RunningBatch, Target
from ml.inference.loading import BaseResolver, ModelMeta
from ml.inference.predict import PredRow
from ml.inference.sampling import GenEvent, RowDecoder, RowParams
from ml.inference.scheduler import GenLane
from ml.inference.types import ModelRef
from ml.modeling import pick_device

MAX_HOP_SECONDS = 0.5  # a hop returns to the lane at least this often (its stats, its queue)
INLINE_ENCODE_CHARS = 2000  # inputs this short are tokenized on the caller's loop
EventQueue = asyncio.Queue[tuple[int, GenEvent | BaseException]]


class DirStore(Protocol):
    """Where checkpoint directories come from (the service's artifact storage)."""

    def local_dir(self, key: str) -> Path: ...


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32  # prediction batches; also the rows a generation lane runs at once
    max_wait_ms: float = 0.0  # > 0: an opt-in coalescing window (delays lone requests); see batcher
    max_adapters: int = 32
    max_bases: int = 2
    max_full_models: int = 2
    max_input_tokens: int = 512
    max_new_tokens: int = 512
    device: str = "auto"



@dataclass(frozen=True)
class BatchRecord:
    lane: str
    size: int  # generation: the running batch a join makes (rows already in it + the newcomers)
    adapters: int  # distinct models in the batch


class Engine:
    def __init__(self, config: EngineConfig, *, base_dir: BaseResolver, storage: DirStore) -> None:
        self.config = config
        self.device = pick_device(self.config.device)
        self.cache = ModelCache(self.config.max_bases, self.config.max_adapters, self.config.max_full_models,
                                self.device, self._base_path)
        self.batches: deque[BatchRecord] = deque(maxlen=1000)
        self._base_dir = base_dir
        self._storage = storage
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="inference-model")
        self._lanes: dict[Hashable, Lane] = {}
        self._gen_lanes: dict[Hashable, GenLane] = {}
        self._meta: OrderedDict[str, ModelMeta] = OrderedDict()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- metadata and request preparation (helper threads) ---

    async def meta(self, ref: ModelRef) -> ModelMeta:
        with self._lock:
            cached = self._meta.get(ref.storage_key)
        return cached if cached is not None else await asyncio.to_thread(self._load_meta, ref)

    def _load_meta(self, ref: ModelRef) -> ModelMeta:
        with self._lock:
            cached = self._meta.get(ref.storage_key)
        if cached is not None:
            return cached
        try:
            path = self._storage.local_dir(ref.storage_key)
            if not path.is_dir():
                raise ModelLoadError(f"Model '{ref.name}' has no files in storage ({ref.storage_key}).")
            info = loading.read_info(path, ref)
            meta = loading.load_meta(info, self._base_path(info) if info.is_adapter else None)
        except MLError:
            raise
        except Exception as exc:
            msg = f"Model '{ref.name}' could not be loaded: {type(exc).__name__}: {exc}"
            raise ModelLoadError(msg) from exc
        with self._lock:
            self._meta[ref.storage_key] = meta
            while len(self._meta) > 4 * (self.config.max_adapters + self.config.max_full_models):
                self._meta.popitem(last=False)
        return meta

    def _base_path(self, info: loading.ModelInfo) -> Path:
        """Where an adapter's base weights live: the catalog, or a full checkpoint it was trained on."""
        if info.base_checkpoint_key:
            return self._storage.local_dir(info.base_checkpoint_key)
        return self._base_dir(info.base_model)

    def input_limit(self, meta: ModelMeta) -> tuple[int, str]:
        limit, name = self.config.max_input_tokens, "inference_max_input_tokens"
        if 0 < meta.context < limit:
            limit, name = meta.context, "the model's context length"
        return limit, name

    def check_length(self, meta: ModelMeta, ids: list[int], index: int, param: str) -> None:
        limit, name = self.input_limit(meta)
        if len(ids) > limit:
            raise InputError(
                f"Input {index} has {len(ids)} tokens, over the limit of {limit} ({name}).",
                param=param, code="input_too_long")

    async def encode(self, meta: ModelMeta, texts: list[str], param: str = "input") -> list[list[int]]:
        def run() -> list[list[int]]:
            return [meta.tok.encode(t) for t in texts]

        # A few sentences tokenize in tens of microseconds: less than a hop to a helper thread and back.
        short = sum(len(t) for t in texts) <= INLINE_ENCODE_CHARS
        ids = run() if short else await asyncio.to_thread(run)
        for i, row in enumerate(ids):
            self.check_length(meta, row, i, param)
        return ids

    # --- submission (any event loop) ---

    async def predict(self, meta: ModelMeta, rows: list[list[int]], top_k: int = 5) -> list[dict[str, Any]]:
        caller = asyncio.get_running_loop()
        futures = [caller.create_future() for _ in rows]
        self._submit([PredictItem(meta, ids, top_k, _deliver_to(caller, fut))
                      for ids, fut in zip(rows, futures, strict=True)])
        return list(await asyncio.gather(*futures))

    async def generate(self, meta: ModelMeta, rows: list[tuple[list[int], RowParams]]
                       ) -> AsyncGenerator[tuple[int, GenEvent], None]:
        """Yields (row index, event) as tokens come; each row ends with a `finish_reason`."""
        caller = asyncio.get_running_loop()
        events: EventQueue = asyncio.Queue()
        items = [self._gen_item(meta, i, ids, params, caller, events) for i, (ids, params) in enumerate(rows)]
        self._submit(items)
        remaining = len(items)
        try:
            while remaining:
                index, event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                if event.finish_reason is not None:
                    remaining -= 1
                yield index, event
        finally:
            for item in items:
                item.cancelled.set()  # a consumer that went away frees its rows

    @staticmethod
    def _gen_item(meta: ModelMeta, index: int, ids: list[int], params: RowParams,
                  caller: asyncio.AbstractEventLoop, events: EventQueue) -> GenerateItem:
        cancelled = threading.Event()

        def put(value: GenEvent | BaseException) -> None:
            try:
                caller.call_soon_threadsafe(events.put_nowait, (index, value))
            except RuntimeError:  # the caller's loop is closed: nobody listens, the row can stop
                cancelled.set()

        return GenerateItem(meta, ids, params, sink=put, deliver=put, cancelled=cancelled)

    def _submit(self, items: Sequence[Item]) -> None:
        """A request's rows in one hop: they reach their lane together, so they batch together."""
        self._engine_loop().call_soon_threadsafe(self._enqueue, items)

    def _enqueue(self, items: Sequence[Item]) -> None:
        for item in items:
            key = _lane_key(item.meta)
            if isinstance(item, GenerateItem):
                self._gen_lane(key).queue.put_nowait(item)
                continue
            lane = self._lanes.get(key)
            if lane is None:
                lane = self._lanes[key] = Lane(key, self._run_batch, self._model_thread,
                                               self.config.max_batch_size, self.config.max_wait_ms / 1000)
            lane.queue.put_nowait(item)

    def _gen_lane(self, key: Hashable) -> GenLane:
        lane = self._gen_lanes.get(key)
        if lane is None:
            lane = self._gen_lanes[key] = GenLane(key, self._gen_hop, self._model_thread, self.config.max_batch_size,
                                                  self.config.max_wait_ms / 1000)
        return lane

    def lane_stats(self) -> LaneStats:
        """The batchers' counters, summed over lanes (generation lanes count admissions as batches)."""
        total = LaneStats()
        lanes: list[Lane | GenLane] = [*self._lanes.values(), *self._gen_lanes.values()]
        for lane in lanes:
            for name, value in vars(lane.stats).items():
                setattr(total, name, getattr(total, name) + value)
        return total

    def _engine_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=_run_forever, args=(loop,), name="inference-batcher",
                                          daemon=True)
                thread.start()
                self._loop = loop
            return self._loop

    async def logits(self, meta: ModelMeta, ids: list[int]) -> torch.Tensor:
        """Raw logits of one row as a prediction batch computes them ([C], or [T, V] for language models; the
        first generation step runs the same forward): checks a checkpoint against the model that trained it."""
        return await asyncio.wrap_future(self._model_thread.submit(self._row_logits, meta, ids))

    # --- cache control ---

    async def evict(self, storage_key: str) -> bool:
        with self._lock:
            self._meta.pop(storage_key, None)
        return await asyncio.wrap_future(self._model_thread.submit(self.cache.evict, storage_key))

    def stats(self) -> dict[str, Any]:
        return {**self.cache.snapshot(), "batches": len(self.batches), "batcher": vars(self.lane_stats())}

    def close(self) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            done = asyncio.run_coroutine_threadsafe(self._cancel_lanes(), loop)
            with contextlib.suppress(Exception):
                done.result(timeout=5)
            loop.call_soon_threadsafe(loop.stop)
        self._model_thread.shutdown(wait=False, cancel_futures=True)

    async def _cancel_lanes(self) -> None:
        tasks = [lane.task for lane in self._lanes.values()] + [lane.task for lane in self._gen_lanes.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._lanes.clear()
        self._gen_lanes.clear()

    # --- the model thread ---

    def _run_batch(self, items: list[Item]) -> None:
        self.batches.append(BatchRecord(str(_lane_key(items[0].meta)), len(items),
                                        len({i.meta.info.storage_key for i in items})))
        with torch.inference_mode():
            for group in self._bind(items):
                try:
                    self._run_group(group)
                except Exception as exc:
                    err = exc if isinstance(exc, MLError) else ModelLoadError(
                        f"Inference failed: {type(exc).__name__}: {exc}")
                    err.__cause__ = exc
                    for item in group.items:
                        item.deliver(err)

    def _bind(self, items: list[Item]) -> list[Group]:
        """Load what the batch needs (pinned against eviction) and split it into forwards."""
        pinned = {i.meta.info.storage_key for i in items} | self._generating()
        bound: dict[str, Any] = {}
        groups: dict[Hashable, Group] = {}
        for item in items:
            key = item.meta.info.storage_key
            try:
                entry = bound[key] = bound[key] if key in bound else self._load(item.meta, pinned)
            except Exception as exc:
                item.deliver(ModelLoadError(f"Model could not be loaded: {type(exc).__name__}: {exc}"))
                continue
            group = "mixed" if getattr(entry, "mixable", False) else key
            groups.setdefault(group, Group(entry)).add(item, entry)
        return [g.sorted() for g in groups.values()]

    def _load(self, meta: ModelMeta, pinned: set[str]) -> AdapterEntry | FullEntry:
        if meta.info.is_adapter:
            return self.cache.adapter(meta.info, pinned, meta.pad_id)
        return self.cache.full_model(meta.info, pinned)

    def _run_group(self, group: Group) -> None:
        self._predict(group, *group.target())  # generation runs in hops (`_gen_hop`)

    def _predict(self, group: Group, model: Any, extra: dict[str, Any], embed: Any) -> None:
        items: list[PredictItem] = group.items  # type: ignore[assignment]
        rows, logits = self._forward(group, model, extra, embed)
        for i, (item, row) in enumerate(zip(items, rows, strict=True)):
            item.deliver(predict.postprocess(item.meta.info.task, row, logits[i]))

    def _forward(self, group: Group, model: Any, extra: dict[str, Any],
                 embed: Any) -> tuple[list[PredRow], torch.Tensor]:
        items: list[PredictItem] = group.items  # type: ignore[assignment]
        rows = [PredRow(i.ids, i.meta, name, prefix, i.top_k)
                for i, (name, prefix) in zip(items, group.row_adapters, strict=True)]
        logits = predict.forward(model, rows, decoder=items[0].meta.is_decoder, device=self.device,
                                 extra=extra, embed_model=embed)
        return rows, logits

    def _row_logits(self, meta: ModelMeta, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            entry = self._load(meta, {meta.info.storage_key})
            group = Group(entry).add(PredictItem(meta, ids, 0, lambda _: None), entry)
            return self._forward(group, *group.target())[1][0]

    # --- generation hops (the model thread) ---

    def _gen_hop(self, lane: GenLane, admit: list[GenerateItem]) -> list[GenerateItem]:
        """Newcomers join their running batch, then every batch of the lane takes a decode step, and
        more steps while nothing else waits (no newcomer that could join, no other work for the
        model thread). Returns the newcomers that must wait (their batch cannot take rows mid-way)."""
        deferred: list[GenerateItem] = []
        joining: dict[Hashable, list[GenRow]] = {}
        with torch.inference_mode():
            pinned = self._generating() | {i.meta.info.storage_key for i in admit}
            for item in admit:
                try:
                    entry = self._load(item.meta, pinned)
                except Exception as exc:
                    item.deliver(ModelLoadError(f"Model could not be loaded: {type(exc).__name__}: {exc}"))
                    continue
                key = _gen_group(entry)
                batch = lane.batches.get(key)
                if batch is not None and batch and not batch.joinable:
                    deferred.append(item)
                    continue
                joining.setdefault(key, []).append(self._gen_row(item, entry))
            self._step_lane(lane, joining, pinned)
            deadline = time.monotonic() + MAX_HOP_SECONDS
            while lane.batches and lane.nothing_to_admit() and not self._model_thread._work_queue.qsize() \
                    and time.monotonic() < deadline:
                self._step_lane(lane, {}, pinned)  # nobody else is waiting: skip the round trip
        return deferred

    def _step_lane(self, lane: GenLane, joining: dict[Hashable, list[GenRow]], pinned: set[str]) -> None:
        for key in [*lane.batches, *(k for k in joining if k not in lane.batches)]:
            rows = joining.get(key, [])
            batch = lane.batches.get(key) or RunningBatch(rows[0].owner.meta.pad_id, self.device)
            lane.batches[key] = batch
            self._advance(lane, batch, rows, pinned)
            if not batch:
                del lane.batches[key]

    def _advance(self, lane: GenLane, batch: RunningBatch, rows: list[GenRow], pinned: set[str]) -> None:
        try:
            target = self._gen_target(batch.rows + rows, pinned)
            if rows:  # recorded first: a row may finish (and its caller return) during the join
                joined = batch.rows + rows
                self.batches.append(BatchRecord(str(lane.key), len(joined),
                                                len({r.owner.meta.info.storage_key for r in joined})))
                batch.join(target, rows)
            batch.step(target)
        except Exception as exc:
            err = exc if isinstance(exc, MLError) else ModelLoadError(
                f"Inference failed: {type(exc).__name__}: {exc}")
            err.__cause__ = exc
            for row in [*batch.rows, *rows]:
                if not row.decoder.done:
                    row.decoder.cancel()
                    row.owner.deliver(err)
            batch.clear()

    @staticmethod
    def _gen_row(item: GenerateItem, entry: Any) -> GenRow:
        return GenRow(item.ids, RowDecoder(item.params, item.meta.tok, item.meta.eos_ids, item.sink),
                      getattr(entry, "name", None), getattr(entry, "prompt", None), item.cancelled.is_set,
                      owner=item)

    def _gen_target(self, rows: list[GenRow], pinned: set[str]) -> Target:
        """The module a batch runs on, resolved afresh each step: a model evicted (or reloaded)
        since the last step comes back from the cache; rows keep their KV cache either way."""
        metas = {r.owner.meta.info.storage_key: r.owner.meta for r in rows}
        entries = [self._load(meta, pinned) for meta in metas.values()]
        entry = entries[0]
        if not isinstance(entry, AdapterEntry):
            return Target(entry.model)
        wrapper = entry.wrapper
        names = [e.name for e in entries if isinstance(e, AdapterEntry)]
        if wrapper.active_adapter not in names:
            wrapper.set_adapter(names[0])  # a task head (modules_to_save) is only used when active
        if entry.info.is_prompt:
            base = wrapper.get_base_model()
            return Target(base, embed_model=base)  # type: ignore[arg-type]
        return Target(wrapper, mixed=entry.mixable)

    def _generating(self) -> set[str]:
        """Models with rows in a running batch: pinned against eviction while they decode."""
        return {row.owner.meta.info.storage_key for lane in list(self._gen_lanes.values())
                for batch in list(lane.batches.values()) for row in batch.rows}


@dataclass
class Group:
    """Items that run as one forward: one full model, one non-mixable adapter, or many LoRAs."""

    entry: Any  # AdapterEntry | FullEntry (of the first item)
    items: list[Item] = field(default_factory=list)
    row_adapters: list[tuple[str | None, torch.Tensor | None]] = field(default_factory=list)

    def add(self, item: Item, entry: Any) -> Group:
        self.items.append(item)
        self.row_adapters.append((getattr(entry, "name", None), getattr(entry, "prompt", None)))
        return self

    def sorted(self) -> Group:
        """Rows of one adapter next to each other: contiguous slices in mixed LoRA forwards."""
        order = sorted(range(len(self.items)), key=lambda i: self.row_adapters[i][0] or "")
        self.items = [self.items[i] for i in order]
        self.row_adapters = [self.row_adapters[i] for i in order]
        return self

    def target(self) -> tuple[Any, dict[str, Any], Any]:
        """(module to call, extra forward kwargs, module whose embeddings take the prompt or None)."""
        entry = self.entry
        if not hasattr(entry, "wrapper"):
            return entry.model, {}, None
        wrapper = entry.wrapper
        names = [n for n, _ in self.row_adapters]
        if wrapper.active_adapter not in names:
            wrapper.set_adapter(names[0])  # a task head (modules_to_save) is only used when active
        if entry.info.is_prompt:
            base = wrapper.get_base_model()
            return base, {}, base
        if entry.mixable:
            return wrapper, {"adapter_names": names}, None
        return wrapper, {}, None


def _run_forever(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()


def _gen_group(entry: AdapterEntry | FullEntry) -> Hashable:
    """Rows that decode as one batch: all mixable LoRAs of a lane (per-row `adapter_names`), all
    prompt-tuned adapters (the base with per-row prefixes), else one model."""
    if isinstance(entry, AdapterEntry) and entry.mixable:
        return "mixed"
    if isinstance(entry, AdapterEntry) and entry.info.is_prompt:
        return "prompt"
    return entry.info.storage_key


def _lane_key(meta: ModelMeta) -> Hashable:
    info = meta.info
    return ("adapter", info.base_key, info.peft_type) if info.is_adapter else ("full", info.storage_key)


def _deliver_to(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any]) -> Any:
    def settle(value: Any) -> None:
        if fut.done():
            return
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)

    return lambda value: loop.call_soon_threadsafe(settle, value)
