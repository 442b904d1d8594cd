"""Continuous batching for generation on CPU, with the real smollm2-135m chat model:

8 chat requests of different prompt lengths and token budgets arrive staggered at the in-process
engine (`ml.inference.engine.Engine`), which streams every token as it comes. Measured in the same run:
- aggregate tokens/s vs ONE batched HF `model.generate` of the same prompts (all present at t=0, left
  padded, greedy, run to the largest budget: the strongest baseline) and vs serving them one at a time;
- time to first token, p50 over the 8, vs the p50 of the same requests served alone.
Goals: >= 0.9x batched generate, >= 3x serial, TTFT p50 <= 2x alone.

    python bench/generation.py [--threads 1] [--stagger-ms MS] [--rounds 3]

Requests arrive two lone time-to-first-token p50s apart by default (measured in the serial run): prefill
then takes about half the machine. Denser arrivals queue on prefill compute itself, which no scheduler
can hide on a CPU (batched prefill is no cheaper per token there), and TTFT then measures that backlog.

Greedy decoding everywhere, so every mode produces the same tokens; a row counts its tokens up to its
own budget or end of turn (what a client receives). The batched runs alternate between the engine and
HF generate (and a lone-TTFT pass) `--rounds` times; the ratios within each round count, the median
over rounds is the headline (load elsewhere on the machine drifts between rounds).
One torch thread by default: on a small shared box more threads mostly spin (every mode uses the same)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from app.models_registry.catalog import local_base
from ml.inference.engine import Engine, EngineConfig
from ml.inference.loading import ModelMeta
from ml.inference.sampling import RowParams
from ml.inference.types import ModelRef

MODEL = "smollm2-135m"
STORY = ("The old lighthouse keeper had watched the same stretch of coast for forty years. Every night he "
         "climbed the spiral stairs, trimmed the wick and polished the great lens until it shone. ")
REQUESTS: list[tuple[str, int]] = [  # (user message, max_tokens)
    ("Write a long story about a dragon who learns to bake bread.", 96),
    ("Say hello in three languages.", 16),
    (f"Summarize this text: {STORY * 4}", 40),
    ("Explain how a refrigerator works, step by step, in detail.", 80),
    (f"Continue the story: {STORY * 2}", 64),
    ("List ten fruits and one fact about each.", 112),
    ("What is the capital of France? Answer in one sentence.", 24),
    (f"Rewrite this in simpler words: {STORY * 3}", 72),
]


@dataclass
class Run:
    seconds: float
    tokens: int
    ttft: list[float]

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


class Store:
    """The catalog's converted base model dir stands in for a served full checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def local_dir(self, key: str) -> Path:
        return self.path


async def _one(engine: Engine, meta: ModelMeta, ids: list[int], budget: int, delay: float) -> tuple[float, int]:
    await asyncio.sleep(delay)
    start = time.perf_counter()
    first, tokens = 0.0, 0
    async for _, event in engine.generate(meta, [(ids, RowParams(max_new_tokens=budget, temperature=0.0))]):
        if not first and (event.text or event.finish_reason):
            first = time.perf_counter() - start
        if event.finish_reason:
            tokens = event.completion_tokens
    return first, tokens


async def engine_run(engine: Engine, meta: ModelMeta, prompts: list[list[int]], stagger: float) -> Run:
    start = time.perf_counter()
    done = await asyncio.gather(*(_one(engine, meta, ids, budget, i * stagger)
                                  for i, (ids, (_, budget)) in enumerate(zip(prompts, REQUESTS, strict=False))))
    return Run(time.perf_counter() - start, sum(t for _, t in done), [f for f, _ in done])


async def serial_run(engine: Engine, meta: ModelMeta, prompts: list[list[int]]) -> Run:
    seconds, tokens, ttft = 0.0, 0, []
    for ids, (_, budget) in zip(prompts, REQUESTS, strict=True):
        start = time.perf_counter()
        first, count = await _one(engine, meta, ids, budget, 0.0)
        seconds += time.perf_counter() - start
        tokens += count
        ttft.append(first)
    return Run(seconds, tokens, ttft)


def hf_generate(model: PreTrainedModel, meta: ModelMeta, prompts: list[list[int]]) -> Run:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[meta.pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    budgets = [b for _, b in REQUESTS][:len(prompts)]
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(  # type: ignore[operator]
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max(budgets),
            pad_token_id=meta.pad_id, eos_token_id=sorted(meta.eos_ids))
    seconds = time.perf_counter() - start
    tokens = 0
    for row, budget in zip(out[:, width:].tolist(), budgets, strict=True):
        ends = [i for i, t in enumerate(row) if t in meta.eos_ids]
        tokens += min(ends[0] if ends else len(row), budget)
    return Run(seconds, tokens, [])


async def _first_text(engine: Engine, meta: ModelMeta, ids: list[int], budget: int) -> float:
    start = time.perf_counter()
    params = RowParams(max_new_tokens=budget, temperature=0.0)
    async with contextlib.aclosing(engine.generate(meta, [(ids, params)])) as events:
        async for _, event in events:
            if event.text or event.finish_reason:
                return time.perf_counter() - start  # closing the stream cancels the rest
    return time.perf_counter() - start


async def lone_ttft(engine: Engine, meta: ModelMeta, prompts: list[list[int]]) -> list[float]:
    """Each request alone up to its first text, as a client sees it (a first token may decode to
    nothing): the TTFT reference, re-measured every round."""
    return [await _first_text(engine, meta, ids, budget) for ids, (_, budget) in zip(prompts, REQUESTS, strict=True)]


@dataclass
class Round:
    engine: Run
    hf: Run
    lone: list[float]

    @property
    def ttft_ratio(self) -> float:
        return statistics.median(self.engine.ttft) / statistics.median(self.lone)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stagger-ms", type=float, default=None, help="default: 2x the lone TTFT p50")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = local_base(MODEL).path
    engine = Engine(EngineConfig(max_batch_size=16, max_input_tokens=1024, max_new_tokens=256, device="cpu"),
                    base_dir=lambda base: path, storage=Store(path))
    ref = ModelRef(name=MODEL, storage_key=MODEL, task="causal_lm", training_type="full", base_model=MODEL)
    try:
        meta = asyncio.run(engine.meta(ref))
        prompts = [meta.tok.chat([{"role": "user", "content": text}]) for text, _ in REQUESTS]
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        asyncio.run(engine_run(engine, meta, prompts[:2], 0.0))  # warm up (loads the model)
        hf_generate(hf, meta, prompts[:2])
        serial = asyncio.run(serial_run(engine, meta, prompts))
        stagger = 2 * statistics.median(serial.ttft) if args.stagger_ms is None else args.stagger_ms / 1000
        rounds = []
        for _ in range(args.rounds):  # each round: lone TTFTs, the engine, HF generate, back to back
            lone = asyncio.run(lone_ttft(engine, meta, prompts))
            run = asyncio.run(engine_run(engine, meta, prompts, stagger))
            rounds.append(Round(run, hf_generate(hf, meta, prompts), lone))
    finally:
        engine.close()
    vs_hf = statistics.median(r.engine.rate / r.hf.rate for r in rounds)
    vs_serial = statistics.median(r.engine.rate for r in rounds) / serial.rate
    ttft = statistics.median(r.ttft_ratio for r in rounds)
    print(f"continuous batching (median of {args.rounds} rounds): {vs_hf:.2f}x batched HF generate (goal >= 0.9), "
          f"{vs_serial:.2f}x serial (goal >= 3); TTFT p50 {ttft:.2f}x alone (goal <= 2)")
    print(f"  8 requests, {sum(b for _, b in REQUESTS)} max tokens in all, staggered {stagger * 1000:.0f} ms apart; "
          f"torch threads {args.threads}")
    for i, r in enumerate(rounds):
        print(f"  round {i + 1}: engine {r.engine.tokens} tokens in {r.engine.seconds:.2f}s "
              f"= {r.engine.rate:.1f} tok/s "
              f"(TTFT p50 {statistics.median(r.engine.ttft) * 1000:.0f} ms, max {max(r.engine.ttft) * 1000:.0f} ms); "
              f"HF generate at t=0 {r.hf.tokens} tokens in {r.hf.seconds:.2f}s = {r.hf.rate:.1f} tok/s "
              f"-> {r.engine.rate / r.hf.rate:.2f}x; lone TTFT p50 {statistics.median(r.lone) * 1000:.0f} ms "
              f"-> {r.ttft_ratio:.2f}x")
    print(f"  serial (one at a time): {serial.tokens} tokens in {serial.seconds:.2f}s = {serial.rate:.1f} tok/s")


if __name__ == "__main__":
    main()
