"""Training throughput: the service's worker path vs a plain `transformers.Trainer` run.

Same base model (minilm-l6, sequence classification), same data, epochs, batch size, learning
rate, LoRA config and max length, on the same machine, one after the other:

  (a) direct: `transformers.Trainer` with inputs tokenized `padding="max_length"`, as tutorials do;
  (b) service: a real job created through the HTTP API (upload + create), then
      `app.jobs.runner.run_job` on it: claim, lease + heartbeat, `build_recipe`, events, progress,
      checkpoints, final model registration.

Tokens are real (non-pad) tokens for both. Reports tokens/s of each training loop and end to end,
their ratio, the job's queue-to-first-step latency, and the service's overhead: its wall time
minus model setup and optimizer-step compute (claim, DB events/progress, checkpoints, storage,
registration). Runs on its own SQLite + filesystem broker in a temp dir unless TUNEHOUSE_* says
otherwise.

    python bench/train_throughput.py [--examples 128 --epochs 2 --batch-size 16 --max-len 128 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TUNEHOUSE_DATA_DIR", tempfile.mkdtemp(prefix="tunehouse-bench-"))
os.environ.setdefault("TUNEHOUSE_LOG_JSON", "false")
os.environ.setdefault("TUNEHOUSE_DEVICE", "cpu")
for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "minilm-l6"
LORA_R, LORA_ALPHA, LORA_DROPOUT = 8, 16, 0.05


def _words(text: str) -> list[str]:
    return text.split()


POSITIVE = _words("good great excellent wonderful superb delightful pleasant brilliant lovely fine")
NEGATIVE = _words("bad awful terrible poor horrible dreadful boring ugly weak broken")
FILLER = _words("the a movie film plot actor scene story music camera ending dialogue character director it "
                "was and but very quite rather somewhat really truly with without of in on for to this that")


@dataclass
class Args:
    examples: int
    epochs: int
    batch_size: int
    max_len: int
    learning_rate: float
    seed: int


@dataclass(eq=False)
class Timers:
    """Wall seconds, and process CPU seconds (all threads) as `<label>_cpu`, accumulated per label.
    CPU time is the steadier figure on a machine shared with other work."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def time(self, label: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self._add(label, time.perf_counter() - t0)
            self._add(f"{label}_cpu", time.process_time() - c0)

    def _add(self, label: str, value: float) -> None:
        self.seconds[label] = self.seconds.get(label, 0.0) + value

    def wrap(self, owner: Any, name: str, label: str) -> None:
        fn: Callable[..., Any] = getattr(owner, name)

        def timed(*a: Any, **kw: Any) -> Any:
            with self.time(label):
                return fn(*a, **kw)

        setattr(owner, name, timed)


# --- data -----------------------------------------------------------------------------------------

def make_records(n: int, seed: int) -> list[dict[str, str]]:
    """Review-like texts, lengths long-tailed (median ~25 words, a few past max_len)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.choices(FILLER, k=max(3, int(rng.lognormvariate(3.1, 0.7))))
        cues = POSITIVE if label == "positive" else NEGATIVE
        for _ in range(1 + len(words) // 12):
            words.insert(rng.randrange(len(words) + 1), rng.choice(cues))
        out.append({"text": " ".join(words), "label": label})
    return out


def write_jsonl(records: list[dict[str, str]], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- (a) plain Trainer ----------------------------------------------------------------------------

class PaddedDataset:
    def __init__(self, enc: dict[str, list[list[int]]], labels: list[int]) -> None:
        self.enc, self.labels = enc, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        item = {k: torch.tensor(v[i]) for k, v in self.enc.items()}
        item["labels"] = torch.tensor(self.labels[i])
        return item


def run_direct(args: Args, records: list[dict[str, str]], outdir: Path) -> dict[str, float]:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )

    from app.models_registry.catalog import base_model_path, get_spec

    timers = Timers()
    with timers.time("wall"):
        path = base_model_path(get_spec(MODEL))
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=LORA_R,
                                                 lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                                                 target_modules=["query", "value"]))
        texts = [r["text"] for r in records]
        enc = tok(texts, padding="max_length", truncation=True, max_length=args.max_len)
        labels = [0 if r["label"] == "negative" else 1 for r in records]
        targs = TrainingArguments(
            output_dir=str(outdir), per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
            learning_rate=args.learning_rate, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
            logging_steps=10, save_strategy="no", report_to=[], seed=args.seed, use_cpu=True,
            disable_tqdm=True)
        trainer = Trainer(model=model, args=targs, train_dataset=PaddedDataset(dict(enc), labels))
        trainer.remove_callback(PrinterCallback)
        with timers.time("train"):
            trainer.train()
        trainer.save_model(str(outdir / "final"))
    real_tokens = sum(sum(m) for m in enc["attention_mask"]) * args.epochs
    padded_tokens = len(records) * args.max_len * args.epochs
    return {"tokens": real_tokens, "padded_tokens": padded_tokens, **timers.seconds}


# --- (b) the service's worker path ----------------------------------------------------------------

def create_job(args: Args, train_file: Path) -> str:
    from fastapi.testclient import TestClient

    from app.auth.service import create_api_key, get_or_create_project
    from app.kit.db import session_scope
    from app.kit.migrate import upgrade_head
    from app.main import create_app
    from app.settings import get_settings

    upgrade_head(get_settings().resolved_database_url)
    with session_scope() as s:
        key = create_api_key(s, get_or_create_project(s, "bench"), "bench")
    client = TestClient(create_app(), headers={"Authorization": f"Bearer {key}"})
    with train_file.open("rb") as fh:
        r = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": (train_file.name, fh)})
    r.raise_for_status()
    body = {
        "model": MODEL, "training_file": r.json()["id"], "task": "classification", "seed": args.seed,
        "training_type": {"type": "lora", "lora_r": LORA_R, "lora_alpha": LORA_ALPHA,
                          "lora_dropout": LORA_DROPOUT},
        "hyperparameters": {"n_epochs": args.epochs, "batch_size": args.batch_size},
        "learning_rate": args.learning_rate, "max_seq_length": args.max_len,
    }
    job = client.post("/v1/fine_tuning/jobs", json=body)
    job.raise_for_status()
    return str(job.json()["id"])


SERVICE_TIMERS = Timers()


@cache
def instrument(timers: Timers) -> None:
    """Time the recipe's phases and the runner's hooks (once per process)."""
    from ml.training.recipe import TrainingRecipe
    from worker import runner

    timers.wrap(TrainingRecipe, "setup", "setup")
    timers.wrap(TrainingRecipe, "train", "train")
    timers.wrap(TrainingRecipe, "_train_step", "steps")
    timers.wrap(TrainingRecipe, "_save", "save_weights")
    for hook in ("message", "metrics", "progress", "checkpoint"):
        timers.wrap(runner.JobHooks, hook, "hooks")


def job_timeline(job_id: str) -> dict[str, float]:
    from sqlalchemy import select

    from app.kit.db import session_scope
    from app.orm import Job, JobEvent

    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "succeeded", (job.status if job else None, job and job.error)
        first = s.scalar(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "metrics")
                         .order_by(JobEvent.seq).limit(1))
        assert first is not None and job.enqueued_at is not None
        return {"tokens": float(job.trained_tokens or 0),
                "queue_to_first_step": (first.created_at - job.enqueued_at).total_seconds()}


def run_service(args: Args, train_file: Path) -> dict[str, float]:
    from app.jobs.runner import run_job

    timers = SERVICE_TIMERS
    instrument(timers)
    timers.seconds = {}
    with timers.time("wall"):
        job_id = create_job(args, train_file)
        with timers.time("run_job"):
            outcome = run_job(job_id, "bench-worker")
    if outcome != "succeeded":
        raise SystemExit(f"the service run ended {outcome}")
    return {**timers.seconds, **job_timeline(job_id)}


# --- report ---------------------------------------------------------------------------------------

def _row(label: str, direct: float, service: float, fmt: str = "16.0f") -> None:
    print(f"{label:30}{direct:{fmt}}{service:{fmt.replace('16', '12')}}{service / direct:8.2f}x")


def summed(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r.get(k, 0.0) for r in runs) for k in runs[0]}


def report(args: Args, direct: dict[str, float], service: dict[str, float], repeats: int) -> None:
    tok_d, tok_s = direct["tokens"], service["tokens"]
    overhead = service["run_job"] - service["setup"] - service["steps"]
    print(f"\n{MODEL} classification, LoRA r={LORA_R}, {args.examples} examples x {args.epochs} epochs, "
          f"batch {args.batch_size}, max_len {args.max_len}, {_threads()} CPU threads, {repeats} run(s) each"
          " (sums)")
    print(f"real tokens: direct {tok_d:.0f} (of {direct['padded_tokens']:.0f} padded), service {tok_s:.0f}")
    print(f"{'':30}{'direct Trainer':>16}{'service':>12}{'ratio':>8}")
    _row("train loop wall s", direct["train"], service["train"], "16.1f")
    _row("tokens/s (train loop)", tok_d / direct["train"], tok_s / service["train"])
    _row("tokens/CPU-s (train loop)", tok_d / direct["train_cpu"], tok_s / service["train_cpu"])
    _row("wall s (load..saved model)", direct["wall"], service["run_job"], "16.1f")
    _row("tokens/s (wall)", tok_d / direct["wall"], tok_s / service["run_job"])
    print(f"queue-to-first-step latency: {service['queue_to_first_step'] / repeats:.2f} s per job "
          f"(enqueued_at -> first metrics event; model setup {service['setup'] / repeats:.2f} s of it)")
    print(f"service overhead: {overhead:.2f} s = {100 * overhead / service['run_job']:.1f}% of run_job wall "
          f"(hooks/DB {service.get('hooks', 0):.2f} s incl. checkpoint storage, weight saves "
          f"{service.get('save_weights', 0):.2f} s, rest {overhead - service.get('hooks', 0):.2f} s)")
    print(f"API upload + job create: {service['wall'] - service['run_job']:.2f} s (not in the figures above)")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def parse() -> tuple[Args, int]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--repeats", type=int, default=2, help="runs of each, alternating order (ABBA...)")
    ns = vars(p.parse_args())
    repeats = ns.pop("repeats")
    return Args(**ns), repeats


def main() -> None:
    import logging

    args, repeats = parse()
    logging.disable(logging.WARNING)
    records = make_records(args.examples, args.seed)
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    train_file = write_jsonl(records, work / "train.jsonl")
    lengths = sorted(len(r["text"].split()) for r in records)
    print(f"data: {len(records)} texts, words median {lengths[len(lengths) // 2]}, "
          f"p90 {lengths[math.floor(len(lengths) * 0.9)]}, max {lengths[-1]}")
    direct: list[dict[str, float]] = []
    service: list[dict[str, float]] = []
    for i in range(repeats):
        order = ("direct", "service") if i % 2 == 0 else ("service", "direct")
        for which in order:
            if which == "direct":
                direct.append(run_direct(args, records, work / f"direct-{i}"))
            else:
                service.append(run_service(args, train_file))
            print(f"{which} run {i + 1}: {(direct if which == 'direct' else service)[-1]['wall']:.1f} s")
    report(args, summed(direct), summed(service), repeats)


if __name__ == "__main__":
    main()
