"""Continuous batching: generation requests join a running batch between decode steps and leave it
as soon as they finish or are cancelled, and every row still gets the tokens it gets alone. The
interleaving is made deterministic by holding the engine's model thread (work submitted meanwhile,
such as a lane's next hop, queues behind it), never by sleeps; it is asserted on the engine's own
join records and on the order events arrive in."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.inference.local import make_engine
from app.settings import get_settings
from ml.inference.engine import Engine, EngineConfig, _lane_key
from ml.inference.generation import GenRow, RunningBatch, Target, _prefill_groups, generate
from ml.inference.loading import ModelMeta, Tok
from ml.inference.sampling import GenEvent, RowDecoder, RowParams
from ml.inference.scheduler import GenLane
from ml.inference.types import ModelRef
from ml.modeling import load_tokenizer
from tests.inference import artifacts
from tests.inference.conftest import Artifacts

LONG = 32
Log = list[tuple[str, GenEvent]]


def _engine(max_rows: int) -> Engine:
    return make_engine(get_settings(), EngineConfig(max_batch_size=max_rows, max_adapters=8, max_bases=2,
                                                    max_input_tokens=64, max_new_tokens=LONG))


@pytest.fixture(scope="module")
def cb_engine() -> Iterator[Engine]:
    eng = _engine(max_rows=3)
    yield eng
    eng.close()


class Gate:
    """Holds the engine's model thread until opened."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.started = threading.Event()
        self.release = threading.Event()
        self.done = engine._model_thread.submit(self._hold)

    def _hold(self) -> None:
        self.started.set()
        self.release.wait(60)

    def queued(self, n: int = 1) -> bool:
        """The gate holds the thread and `n` calls wait behind it."""
        return self.started.is_set() and self.engine._model_thread._work_queue.qsize() == n

    def open(self) -> None:
        self.release.set()


def _wait_until(check: Callable[[], bool], deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.002)


async def _until(check: Callable[[], bool]) -> None:
    await asyncio.to_thread(_wait_until, check)


async def _meta(engine: Engine, key: str) -> ModelMeta:
    return await engine.meta(ModelRef(name=key, storage_key=key, task="causal_lm"))


async def _stream(engine: Engine, name: str, key: str, prompt: str, params: RowParams, log: Log) -> None:
    meta = await _meta(engine, key)
    async for _, event in engine.generate(meta, [(meta.tok.encode(prompt), params)]):
        log.append((name, event))


def _result(log: Log, name: str) -> tuple[str, str | None, int]:
    events = [e for n, e in log if n == name]
    return "".join(e.text for e in events), events[-1].finish_reason, events[-1].completion_tokens


def _alone(engine: Engine, key: str, prompt: str, params: RowParams) -> tuple[str, str | None, int]:
    log: Log = []
    asyncio.run(_stream(engine, "x", key, prompt, params, log))
    return _result(log, "x")


def _lane(engine: Engine, key: str) -> GenLane:
    meta = asyncio.run(_meta(engine, key))
    return engine._gen_lanes[_lane_key(meta)]


@pytest.mark.parametrize("kind", ["lora", "prompt", "full"])
def test_rows_joining_and_leaving_a_running_batch_get_their_alone_tokens(cb_engine: Engine, arts: Artifacts,
                                                                          kind: str) -> None:
    long_key, join_key = {"lora": (arts.lm_lora, arts.lm_lora_b), "prompt": (arts.lm_prompt, arts.lm_prompt),
                          "full": (arts.lm_full, arts.lm_full)}[kind]
    reqs = {"long": (long_key, "hello", RowParams(LONG, temperature=0.0)),
            "joined": (join_key, "a b c d e f g h i j k", RowParams(20, temperature=0.0)),
            "short": (long_key, "once upon a time", RowParams(4, temperature=0.8, seed=7))}
    for key in {long_key, join_key}:  # warm: a cold load must not run inside a gated hop
        _alone(cb_engine, key, "warm", RowParams(1))
    lane = _lane(cb_engine, long_key)
    joins_before = len(cb_engine.batches)
    log: Log = []

    async def scenario() -> None:
        first = Gate(cb_engine)
        long = asyncio.create_task(_stream(cb_engine, "long", *reqs["long"], log))
        await _until(lambda: first.queued())  # the long request's first hop waits behind the gate
        second = Gate(cb_engine)
        first.open()  # hop 1: the long row's prefill and first step; then `second` holds the thread
        await _until(lambda: second.queued())  # hop 2 waits: the long row is mid-generation
        others = [asyncio.create_task(_stream(cb_engine, n, *reqs[n], log)) for n in ("joined", "short")]
        await _until(lambda: lane.queue.qsize() == 2)
        second.open()  # the next hop: both newcomers join, then everyone steps
        await asyncio.gather(long, *others)

    asyncio.run(scenario())
    joins = list(cb_engine.batches)[joins_before:]
    assert [j.size for j in joins] == [1, 3]  # the long row alone, then two rows joined it
    if kind == "lora":
        assert joins[-1].adapters == 2  # two adapters decode in one running batch
    order = [(n, e.finish_reason is not None) for n, e in log]
    assert order.index(("joined", False)) < order.index(("long", True))  # streamed while the long row runs
    assert order.index(("short", True)) < order.index(("joined", True)) < order.index(("long", True))
    for name, (key, prompt, params) in reqs.items():
        assert _result(log, name) == _alone(cb_engine, key, prompt, params), name
    _wait_until(lambda: not lane.batches)  # everyone left: the batch and its cache are gone


def test_cancelling_a_stream_frees_its_slot(arts: Artifacts) -> None:
    eng = _engine(max_rows=2)
    reqs = {"a": (arts.lm_lora, "hello", RowParams(LONG, temperature=0.0)),
            "b": (arts.lm_lora_b, "a b c d e f g h i j k", RowParams(LONG, temperature=0.0)),
            "c": (arts.lm_lora, "once upon a time", RowParams(8, temperature=0.0))}
    try:
        for key in (arts.lm_lora, arts.lm_lora_b):
            _alone(eng, key, "warm", RowParams(1))
        lane = _lane(eng, arts.lm_lora)
        joins_before, admitted_before = len(eng.batches), lane.stats.items
        log: Log = []

        async def scenario() -> None:
            first = Gate(eng)
            a = asyncio.create_task(_stream(eng, "a", *reqs["a"], log))
            await _until(lambda: first.queued())
            second = Gate(eng)
            first.open()  # hop 1: a runs; `second` holds the thread
            await _until(lambda: second.queued())
            b = asyncio.create_task(_stream(eng, "b", *reqs["b"], log))
            await _until(lambda: lane.queue.qsize() == 1)
            third = Gate(eng)
            second.open()  # hop 2: b joins (the lane is full now); `third` holds the thread
            await _until(lambda: third.queued())
            c = asyncio.create_task(_stream(eng, "c", *reqs["c"], log))
            await _until(lambda: lane.queue.qsize() == 1)
            a.cancel()  # the consumer goes away mid-stream
            await asyncio.gather(a, return_exceptions=True)
            third.open()  # a's row leaves at the next step; c takes its slot
            await asyncio.gather(b, c)

        asyncio.run(scenario())
        joins = list(eng.batches)[joins_before:]
        assert [j.size for j in joins] == [1, 2, 2]  # a; a + b; then b + c (c had to wait for a slot)
        assert lane.stats.items - admitted_before == 3
        assert all(e.finish_reason is None for n, e in log if n == "a")  # a never finished
        assert order_of(log, "c", finished=False) < order_of(log, "b", finished=True)  # c ran beside b
        for name in ("b", "c"):
            assert _result(log, name) == _alone(eng, *reqs[name]), name
    finally:
        eng.close()


def order_of(log: Log, name: str, finished: bool) -> int:
    return [(n, e.finish_reason is not None) for n, e in log].index((name, finished))


@pytest.fixture(scope="module")
def lm() -> tuple[torch.nn.Module, Tok]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(artifacts.base_dir(artifacts.DECODER))
    with torch.no_grad():  # varied greedy output (the raw tiny-lm repeats itself)
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.3)
    return model.eval(), Tok(load_tokenizer(artifacts.base_dir(artifacts.DECODER)))


def _row(tok: Tok, prompt: str, n: int, repeat: int) -> GenRow:
    decoder = RowDecoder(RowParams(n, temperature=0.0), tok, set(), lambda _: None)
    return GenRow(tok.encode(prompt) * repeat, decoder)


def test_running_batch_trims_padding_and_matches_alone(lm: tuple[torch.nn.Module, Tok]) -> None:
    model, tok = lm
    target = Target(model)
    specs = [("the quick brown fox", 3, 6), ("hi", 12, 1), ("once upon a time there was", 9, 1)]
    alone = []
    with torch.inference_mode():
        for prompt, n, repeat in specs:
            row = _row(tok, prompt, n, repeat)
            generate(model, [row], pad_id=0, device=torch.device("cpu"))
            alone.append(row.decoder.tokens)
        rows = [_row(tok, p, n, r) for p, n, r in specs]
        batch = RunningBatch(0, torch.device("cpu"))
        batch.join(target, rows[:1])  # the long prompt first
        batch.step(target)
        batch.join(target, rows[1:])  # two join mid-way, padded to the common width
        widths = []
        while batch:
            widths.append((len(batch), batch.mask.shape[1]))
            batch.step(target)
    assert [r.decoder.tokens for r in rows] == alone
    long_prompt = len(rows[0].ids)
    # once the long-prompt row left, the padding it left behind is trimmed away
    after = [w for n, w in widths if n == 2]
    assert after and max(after) < long_prompt
    assert max(w for _, w in widths) >= long_prompt


def test_newcomers_prefill_shortest_first_in_groups_of_similar_length(lm: tuple[torch.nn.Module, Tok]) -> None:
    tok = lm[1]
    rows = [GenRow([5] * n, RowDecoder(RowParams(1), tok, set(), lambda _: None)) for n in (30, 2, 8, 31, 3)]
    assert [[len(r.ids) for r in g] for g in _prefill_groups(rows)] == [[2, 3], [8], [30, 31]]
