"""Inference throughput on CPU (runs in well under 3 minutes):

1. 32 concurrent clients on one minilm-l6 LoRA classifier: dynamic batching (max_batch_size=32)
   vs none (max_batch_size=1). Goal: batched >= 4x unbatched.
2. The same load spread over 20 LoRA adapters on one base (mixed-adapter batches) vs all on one
   adapter. Goal: >= 0.7x.

    python bench/inference_bench.py [--seconds 12] [--clients 32]

Everything is built locally in a temp dir (random LoRA weights; the numbers do not depend on
them); each ratio is measured in the same run."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from app.inference.local import LocalInference
from app.inference.schemas import PredictionRequest
from app.kit.storage import LocalStorage
from app.models_registry.catalog import local_base
from ml import checkpoint
from ml.checkpoint import CheckpointInfo
from ml.config import Task, TrainingKind
from ml.inference.engine import Engine, EngineConfig
from ml.inference.types import ModelRef

BASE = "minilm-l6"
LABELS = ["negative", "neutral", "positive"]
TEXTS = [
    "The delivery was late and the package was damaged.",
    "Absolutely loved the service, will come back again!",
    "It was okay, nothing special about it.",
    "Terrible support experience, nobody answered my emails.",
    "Great value for the price and fast shipping.",
    "The product works as described.",
    "I would not recommend this to anyone I know.",
    "Fantastic quality, exceeded my expectations in every way.",
]


@dataclass
class Result:
    requests: int
    seconds: float
    mean_batch: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def build_adapters(storage: LocalStorage, count: int) -> list[str]:
    base = local_base(BASE).path
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(LABELS))
    peft = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16,
                                            target_modules=["query", "value"]))
    keys = []
    for i in range(count):
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_" in name or "modules_to_save" in name:
                    p.normal_(0, 0.05)
        key = f"bench/adapter-{i}"
        info = CheckpointInfo(task=Task.classification, training_type=TrainingKind.lora, base_model=BASE,
                              step=1, epoch=1.0, label_names=LABELS)
        checkpoint.save(storage.local_dir(key), peft, tokenizer, info)
        keys.append(key)
    return keys


async def client_loop(svc: LocalInference, refs: list[ModelRef], offset: int, stop_at: float) -> int:
    done, i = 0, offset
    while time.perf_counter() < stop_at:
        ref = refs[i % len(refs)]
        await svc.predictions(ref, PredictionRequest(model=ref.name, input=TEXTS[i % len(TEXTS)], top_k=1))
        done, i = done + 1, i + 1
    return done


class Case:
    """A warm engine + its own event loop; `run` adds one timed round to its totals."""

    def __init__(self, storage: LocalStorage, keys: list[str], max_batch: int, clients: int) -> None:
        self.engine = Engine(EngineConfig(max_batch_size=max_batch, max_adapters=32, device="cpu"),
                             base_dir=lambda base: local_base(base).path, storage=storage)
        self.svc = LocalInference(self.engine, timeout_s=300)
        self.refs = [ModelRef(name=k, storage_key=k, task="classification") for k in keys]
        self.clients = clients
        self.loop = asyncio.new_event_loop()
        self.total = Result(0, 0.0, 0.0)
        self._sizes: list[int] = []
        self.loop.run_until_complete(self._warm())

    async def _warm(self) -> None:
        for ref in self.refs:  # load every adapter before timing
            await self.svc.predictions(ref, PredictionRequest(model=ref.name, input=TEXTS[0], top_k=1))
        await self._clients(time.perf_counter() + 1.0)

    async def _clients(self, stop_at: float) -> int:
        loops = [client_loop(self.svc, self.refs, c, stop_at) for c in range(self.clients)]
        counts = await asyncio.gather(*loops)
        return sum(counts)

    def run(self, seconds: float) -> None:
        first = len(self.engine.batches)
        start = time.perf_counter()
        done = self.loop.run_until_complete(self._clients(start + seconds))
        self.total.requests += done
        self.total.seconds += time.perf_counter() - start
        self._sizes += [b.size for b in list(self.engine.batches)[first:]]
        self.total.mean_batch = sum(self._sizes) / max(1, len(self._sizes))

    def close(self) -> None:
        self.engine.close()
        self.loop.close()


def compare(a: Case, b: Case, seconds: float, rounds: int) -> tuple[Result, Result]:
    """Alternate short rounds (a, b, a, b, ...) so load changes on the machine hit both alike."""
    for _ in range(rounds):
        a.run(seconds / rounds)
        b.run(seconds / rounds)
    return a.total, b.total


def report(label: str, r: Result) -> None:
    print(f"  {label:<32} {r.rate:8.1f} predictions/s  ({r.requests} in {r.seconds:.1f}s, "
          f"mean batch {r.mean_batch:.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per case")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per comparison")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=20)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clients} concurrent clients, "
          f"{args.seconds:g}s per case in {args.rounds} alternating rounds")
    with tempfile.TemporaryDirectory(prefix="tunehouse-bench-") as tmp:
        storage = LocalStorage(Path(tmp))
        keys = build_adapters(storage, args.adapters)
        single = Case(storage, keys[:1], 32, args.clients)
        unbatched = Case(storage, keys[:1], 1, args.clients)
        print("1) one LoRA adapter: batched vs unbatched")
        b, u = compare(single, unbatched, args.seconds, args.rounds)
        report("batched (max_batch_size=32)", b)
        report("unbatched (max_batch_size=1)", u)
        print(f"  -> batched / unbatched = {b.rate / u.rate:.2f}x (goal >= 4x)")
        unbatched.close()
        single.close()
        single = Case(storage, keys[:1], 32, args.clients)
        mixed = Case(storage, keys, 32, args.clients)
        print(f"2) {args.adapters} LoRA adapters on one base vs one adapter (both batched)")
        m, s = compare(mixed, single, args.seconds, args.rounds)
        report(f"{args.adapters}-adapter mix", m)
        report("single adapter", s)
        print(f"  -> mix / single = {m.rate / s.rate:.2f}x (goal >= 0.7x)")
        mixed.close()
        single.close()


if __name__ == "__main__":
    main()
