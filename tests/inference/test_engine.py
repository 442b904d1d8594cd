"""The engine as a library: adapter cache (no-op reload, LRU eviction with delete_adapter) and
dynamic batching, incl. mixed-adapter batches that must equal running each request alone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from app.inference.local import make_engine
from app.settings import get_settings
from ml.inference.engine import Engine, EngineConfig
from ml.inference.loading import ModelMeta
from ml.inference.sampling import RowParams
from ml.inference.types import ModelRef
from tests.inference import artifacts
from tests.inference.conftest import Artifacts


def ref(key: str, task: str = "classification") -> ModelRef:
    return ModelRef(name=key, storage_key=key, task=task)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _predict(engine: Engine, key: str, texts: list[str],
                   task: str = "classification") -> list[dict[str, Any]]:
    meta = await engine.meta(ref(key, task))
    return await engine.predict(meta, await engine.encode(meta, texts))


async def _greedy(engine: Engine, meta: ModelMeta, text: str, n: int = 6) -> str:
    ids = meta.tok.encode(text)
    out = ""
    async for _, event in engine.generate(meta, [(ids, RowParams(max_new_tokens=n, temperature=0.0))]):
        out += event.text
    return out


def _close(a: dict[str, Any], b: dict[str, Any]) -> bool:
    # fp32 batched vs single-row forwards differ by up to ~1e-4 (padding changes the BLAS blocking,
    # more so single-threaded); a wrong head or adapter differs by orders of magnitude more.
    return a["label"] == b["label"] and all(abs(a["scores"][k] - b["scores"][k]) < 5e-4 for k in a["scores"])


@pytest.fixture
def batching_engine() -> Any:
    eng = make_engine(get_settings(), EngineConfig(max_batch_size=16, max_wait_ms=300.0, max_adapters=8, max_bases=2))
    yield eng
    eng.close()


def test_mixed_lora_batch_uses_each_adapters_own_head(batching_engine: Engine, arts: Artifacts) -> None:
    texts = ["I loved this film", "terrible service, never again", "it was fine I guess"]

    async def together() -> tuple[list[Any], list[Any]]:
        return await asyncio.gather(_predict(batching_engine, arts.cls_a, texts),
                                    _predict(batching_engine, arts.cls_b, texts))

    mixed_a, mixed_b = run(together())
    batch = batching_engine.batches[-1]
    assert batch.size == 6 and batch.adapters == 2  # one forward over both adapters
    alone_a = [run(_predict(batching_engine, arts.cls_a, [t]))[0] for t in texts]
    alone_b = [run(_predict(batching_engine, arts.cls_b, [t]))[0] for t in texts]
    assert batching_engine.batches[-1].size == 1
    assert all(_close(x, y) for x, y in zip(mixed_a, alone_a, strict=True))
    assert all(_close(x, y) for x, y in zip(mixed_b, alone_b, strict=True))
    assert any(not _close(x, y) for x, y in zip(alone_a, alone_b, strict=True))  # the heads really differ


def test_many_adapter_batch_uses_the_gathered_path(batching_engine: Engine, arts: Artifacts) -> None:
    keys = [arts.cls_a, arts.cls_b, arts.cls_c]  # >= GATHER_FROM_RUNS adapters: one gathered matmul
    texts = ["I loved this film", "terrible service, never again"]

    async def together() -> list[list[Any]]:
        return list(await asyncio.gather(*(_predict(batching_engine, k, texts) for k in keys)))

    for key in keys:  # load every adapter first: a cold load must not split the batch on a busy machine
        run(_predict(batching_engine, key, texts[:1]))
    mixed = run(together())
    assert batching_engine.batches[-1].adapters == 3
    wrapper = batching_engine.cache.adapters.items[arts.cls_a].wrapper
    assert any("_tunehouse_stacks" in m.__dict__ for m in wrapper.modules())
    for key, got in zip(keys, mixed, strict=True):
        alone = [run(_predict(batching_engine, key, [t]))[0] for t in texts]
        assert all(_close(x, y) for x, y in zip(got, alone, strict=True))


def test_prompt_tuning_sub_batches_match_alone(batching_engine: Engine, arts: Artifacts) -> None:
    texts = ["short", "a somewhat longer input sentence here"]

    async def together() -> tuple[list[Any], list[Any]]:
        return await asyncio.gather(_predict(batching_engine, arts.cls_prompt, texts),
                                    _predict(batching_engine, arts.cls_a, texts))

    mixed_prompt, _ = run(together())
    alone = [run(_predict(batching_engine, arts.cls_prompt, [t]))[0] for t in texts]
    assert all(_close(x, y) for x, y in zip(mixed_prompt, alone, strict=True))


def test_mixed_generation_batch_matches_alone(batching_engine: Engine, arts: Artifacts) -> None:
    async def metas() -> tuple[ModelMeta, ModelMeta]:
        return (await batching_engine.meta(ref(arts.lm_lora, "causal_lm")),
                await batching_engine.meta(ref(arts.lm_lora_b, "causal_lm")))

    meta_a, meta_b = run(metas())
    prompts = ["once upon a time", "the cat"]

    async def together() -> list[str]:
        return list(await asyncio.gather(*(_greedy(batching_engine, m, p)
                                           for m in (meta_a, meta_b) for p in prompts)))

    mixed = run(together())
    assert batching_engine.batches[-1].size == 4 and batching_engine.batches[-1].adapters == 2
    alone = [run(_greedy(batching_engine, m, p)) for m in (meta_a, meta_b) for p in prompts]
    assert mixed == alone
    assert mixed[:2] != mixed[2:]


def test_loading_an_adapter_twice_is_a_noop(arts: Artifacts) -> None:
    eng = make_engine(get_settings(), EngineConfig(max_adapters=4))
    try:
        run(_predict(eng, arts.cls_a, ["x"]))
        run(_predict(eng, arts.cls_a, ["y"]))
        info = run(eng.meta(ref(arts.cls_a))).info
        entry = eng.cache.adapter(info, set())  # direct call: already loaded
        assert eng.cache.stats.adapter_loads == 1 and eng.cache.stats.base_loads == 1
        assert list(entry.wrapper.peft_config) == [entry.name]
    finally:
        eng.close()


def test_adapter_eviction_deletes_the_adapter(arts: Artifacts) -> None:
    eng = make_engine(get_settings(), EngineConfig(max_adapters=2, max_bases=1))
    try:
        for key in (arts.cls_a, arts.cls_b):
            run(_predict(eng, key, ["hello"]))
        first = eng.cache.adapters.items[arts.cls_a]
        wrapper = first.wrapper
        run(_predict(eng, arts.regression, ["hello"], task="regression"))  # another base key: evicts a base
        assert eng.cache.stats.evictions >= 1
        assert len(eng.cache.bases) == 1 and arts.regression in eng.cache.adapters
        assert arts.cls_a not in eng.cache.adapters  # the base was dropped with its adapters
        run(_predict(eng, arts.cls_a, ["hello"]))
        run(_predict(eng, arts.cls_b, ["hello"]))
        run(_predict(eng, arts.cls_prompt, ["hello"]))  # 3rd adapter on the base: LRU (cls_a) goes
        assert arts.cls_a not in eng.cache.adapters and len(eng.cache.adapters) == 2
        live = eng.cache.adapters.items[arts.cls_b].wrapper
        assert first.name not in live.peft_config  # delete_adapter ran on the shared wrapper
        assert wrapper is not live  # the earlier wrapper went away with its base
        assert run(eng.evict(arts.cls_b)) is True and arts.cls_b not in eng.cache.adapters
        assert run(eng.evict(arts.cls_b)) is False
    finally:
        eng.close()


def test_full_models_are_cached_whole(engine: Engine, arts: Artifacts) -> None:
    meta = run(engine.meta(ref(arts.lm_full, "causal_lm")))
    first = run(_greedy(engine, meta, "hello", 4))
    loads = engine.cache.stats.full_loads
    assert run(_greedy(engine, meta, "hello", 4)) == first
    assert engine.cache.stats.full_loads == loads and arts.lm_full in engine.cache.full


def test_prompt_tuned_generation(engine: Engine, arts: Artifacts) -> None:
    meta = run(engine.meta(ref(arts.lm_prompt, "causal_lm")))
    assert meta.info.is_prompt
    out = run(_greedy(engine, meta, "hello", 4))
    assert isinstance(out, str)
    assert run(_greedy(engine, meta, "hello", 4)) == out


def test_adapter_on_a_full_checkpoint_uses_it_as_base(engine: Engine, arts: Artifacts) -> None:
    key = artifacts.lora_on_checkpoint(13, arts.lm_full)
    meta = run(engine.meta(ref(key, "causal_lm")))
    assert meta.info.base_key.base_model == f"checkpoint:{arts.lm_full}"
    assert run(_greedy(engine, meta, "hello", 4)) == run(_greedy(engine, meta, "hello", 4))
    assert engine.cache.adapters.items[key].base.key == meta.info.base_key


def test_row_logits_are_what_a_prediction_scores(engine: Engine, arts: Artifacts) -> None:
    meta = run(engine.meta(ref(arts.cls_a)))
    ids = meta.tok.encode("I loved this film")
    probs = torch.softmax(run(engine.logits(meta, ids)), dim=-1).tolist()
    (pred,) = run(engine.predict(meta, [ids]))
    assert [pred["scores"][name] for name in artifacts.LABELS] == pytest.approx(probs, abs=1e-6)
