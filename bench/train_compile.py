"""Training speed beyond eager PyTorch: tunehouse eager vs `compile: true` (`ml.training.compiled`) vs
`transformers.Trainer` best practice vs a minimal hand-written loop, on the same tokens.

Per case, one epoch over the same examples (the recipe's tokenization), same batch size, LoRA config and
learning rate, one after the other in this process:

  eager     the training recipe (`build_recipe`), `compile: false` (fused AdamW);
  compiled  the same with `compile: true`: the loop's time includes compiling (a cold inductor cache);
  trainer   `transformers.Trainer` with dynamic padding (DataCollatorWithPadding / DataCollatorForSeq2Seq)
            and `train_sampling_strategy="group_by_length"`: the strongest practical baseline;
  hand      a minimal loop over the recipe's own batches (model, loss, backward, fused AdamW step): the limit
            of eager PyTorch for this batching.

Reports real (non-pad) tokens per second of each training loop (wall, the steps only: no setup, eval or
saving) and per CPU-second (this process and its children, compiler included: steadier on a shared box),
as ratios to the Trainer. Cases: minilm-l6 classification (LoRA, full) on real text (shared/data/subj),
smollm2-135m chat SFT LoRA (samples/geography_chat.jsonl).

    python bench/train_compile.py [--threads 1 --examples 256 --batch-size 16 --max-len 128
                                   --cases minilm-lora,minilm-full,smollm2-lora --runners trainer,hand,eager,compiled]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TUNEHOUSE_LOG_JSON", "false")
os.environ.setdefault("TUNEHOUSE_DEVICE", "cpu")
for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# cold by default: compile time is counted in full; TORCHINDUCTOR_CACHE_DIR=<dir> reuses a warm cache
KEEP_CACHE = "TORCHINDUCTOR_CACHE_DIR" in os.environ
CACHE = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or tempfile.mkdtemp(prefix="bench-inductor-"))
os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(CACHE)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # compile in-process: its CPU time is counted

from bench.packing import Hooks  # noqa: E402  (no-op hooks that throw checkpoints away)

SHARED_DATA = next((p for p in (ROOT.parent / "shared" / "data", Path("/work/shared/data")) if p.exists()), None)


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    task: str
    kind: str
    data: Path
    lr: float


CASES = {
    "minilm-lora": Case("minilm-l6 classification LoRA", "minilm-l6", "classification", "lora",
                        (SHARED_DATA or ROOT) / "subj_train.jsonl", 5e-4),
    "minilm-full": Case("minilm-l6 classification full", "minilm-l6", "classification", "full",
                        (SHARED_DATA or ROOT) / "subj_train.jsonl", 5e-5),
    "smollm2-lora": Case("smollm2-135m chat SFT LoRA", "smollm2-135m", "causal_lm", "lora",
                         ROOT / "samples" / "geography_chat.jsonl", 2e-4),
}


@dataclass
class Args:
    threads: int
    examples: int
    batch_size: int
    max_len: int
    seed: int
    runners: list[str]


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class Clock:
    wall: float = 0.0
    cpu: float = 0.0

    @contextmanager
    def run(self) -> Iterator[None]:
        t0, c0 = time.perf_counter(), cpu_seconds()
        try:
            yield
        finally:
            self.wall += time.perf_counter() - t0
            self.cpu += cpu_seconds() - c0




def subset(case: Case, n: int, work: Path) -> Path:
    lines = case.data.read_text().splitlines()
    out = work / f"{case.model}-{n}.jsonl"
    out.write_text("\n".join((lines * (1 + n // max(1, len(lines))))[:n]) + "\n")  # small samples repeat
    return out


def recipe(case: Case, args: Args, train: Path, work: Path, compile_: bool) -> Any:
    from app.models_registry.catalog import local_base
    from ml.config import RecipeConfig
    from ml.training import build_recipe

    cfg = RecipeConfig.model_validate({
        "base_model": case.model, "task": case.task, "seed": args.seed, "n_epochs": 1,
        "training_type": {"type": case.kind, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05},
        "batch_size": args.batch_size, "learning_rate": case.lr, "max_seq_length": args.max_len,
        "training_file_key": "train.jsonl", "compile": compile_, "log_every_steps": 10**9,
    })
    work = Path(tempfile.mkdtemp(dir=work))
    r = build_recipe(cfg, Hooks(), workdir=work, train_path=train, valid_path=None, resume_dir=None,  # type: ignore[arg-type]
                     init_dir=None, base=local_base(case.model))
    r.setup()
    return r


def run_recipe(case: Case, args: Args, train: Path, work: Path, compile_: bool) -> tuple[int, Clock]:
    r = recipe(case, args, train, work, compile_)
    clock, step, steps = Clock(), r._train_step, []

    def timed(*a: Any) -> Any:
        before = Clock(clock.wall, clock.cpu)
        with clock.run():
            out = step(*a)
        steps.append((out.tokens, clock.wall - before.wall, clock.cpu - before.cpu))
        return out

    r._train_step = timed
    outcome = r.train()
    if compile_:  # the steps after the first (which compiles): what a long run converges to
        later = steps[1:]
        STEADY[case.name] = (sum(t for t, _, _ in later), Clock(sum(w for _, w, _ in later),
                                                                 sum(c for _, _, c in later)))
        STEADY["first step"] = (steps[0][0], Clock(steps[0][1], steps[0][2]))
    return outcome.trained_tokens, clock


def run_hand(case: Case, args: Args, train: Path, work: Path) -> tuple[int, Clock]:
    """The recipe's model, batches and fused AdamW in the shortest loop that trains them."""
    import torch

    from ml.modeling import forward_logits
    from ml.training.losses import loss_sum

    r = recipe(case, args, train, work, False)
    batches = [r._collate_train(window[0], (0, i)) for i, window in r._windows(0)]  # no accumulation
    model, opt, task, tokens, clock = r.model, r.optimizer, r.task, 0, Clock()
    model.train()
    with clock.run():
        for batch in batches:
            loss = loss_sum(task, forward_logits(model, batch, task), batch) / batch["n_targets"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(batch["n_tokens"])
    return tokens, clock


def run_trainer(case: Case, args: Args, train: Path, work: Path) -> tuple[int, Clock]:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        DataCollatorForSeq2Seq,
        DataCollatorWithPadding,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )

    from app.models_registry.catalog import local_base

    r = recipe(case, args, train, work, False)  # the same tokens
    tok, base = r.tokenizer, local_base(case.model)
    if case.task == "classification":
        model: Any = AutoModelForSequenceClassification.from_pretrained(base.path, num_labels=len(r.label_names))
        rows = [{"input_ids": e.input_ids, "labels": int(e.target)} for e in r.train_set]
        collator: Any = DataCollatorWithPadding(tok)
        task_type = TaskType.SEQ_CLS
    else:
        model = AutoModelForCausalLM.from_pretrained(base.path)
        rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in r.train_set]
        collator = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100)
        task_type = TaskType.CAUSAL_LM
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if case.kind == "lora":
        model = get_peft_model(model, LoraConfig(task_type=task_type, r=8, lora_alpha=16, lora_dropout=0.05,
                                                 target_modules=base.spec.lora_target_modules))
    targs = TrainingArguments(
        output_dir=str(work / "trainer"), per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        learning_rate=case.lr, lr_scheduler_type="linear", save_strategy="no", report_to=[], seed=args.seed,
        use_cpu=True, disable_tqdm=True, logging_steps=10**9, train_sampling_strategy="group_by_length",
        dataloader_num_workers=0, optim="adamw_torch_fused")
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collator)  # type: ignore[arg-type]
    trainer.remove_callback(PrinterCallback)
    clock = Clock()
    with clock.run():
        trainer.train()
    return sum(len(e.input_ids) for e in r.train_set), clock


STEADY: dict[str, tuple[int, Clock]] = {}
RUNNERS: dict[str, Callable[..., tuple[int, Clock]]] = {
    "trainer": run_trainer,
    "hand": run_hand,
    "eager": partial(run_recipe, compile_=False),
    "compiled": partial(run_recipe, compile_=True),
}


def bench_case(case: Case, args: Args, work: Path) -> None:
    train = subset(case, args.examples, work)
    results: dict[str, tuple[int, Clock]] = {}
    for name in args.runners:
        results[name] = RUNNERS[name](case, args, train, work)
        tokens, clock = results[name]
        print(f"  {name:9} {tokens:7d} tokens  {clock.wall:7.1f} s  {clock.cpu:7.1f} CPU-s", flush=True)
    base_tokens, base = results["trainer"]
    print(f"{case.name}: {args.examples} examples, batch {args.batch_size}, max_len {args.max_len}, "
          f"{args.threads} torch thread(s)")
    print(f"  {'':12}{'tok/s':>9}{'vs Trainer':>12}{'tok/CPU-s':>11}{'vs Trainer':>12}")
    for name, (tokens, clock) in results.items():
        tps, tpc = tokens / clock.wall, tokens / clock.cpu
        print(f"  {name:12}{tps:9.0f}{tps / (base_tokens / base.wall):11.2f}x{tpc:11.0f}"
              f"{tpc / (base_tokens / base.cpu):11.2f}x", flush=True)
    if "compiled" not in results or "eager" not in results:
        return
    first, steady = STEADY.pop("first step"), STEADY.pop(case.name)
    eager_tokens, eager = results["eager"]
    print(f"  compiled after its first step: {steady[0] / steady[1].cpu:.0f} tok/CPU-s = "
          f"{steady[0] / steady[1].cpu / (eager_tokens / eager.cpu):.2f}x eager; the first step (compiling) "
          f"took {first[1].wall:.1f} s, {first[1].cpu:.1f} CPU-s", flush=True)


def main() -> None:
    import logging

    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--runners", default=",".join(RUNNERS), help="trainer (the baseline) first")
    ns = vars(p.parse_args())
    cases = ns.pop("cases").split(",")
    ns["runners"] = ns["runners"].split(",")
    args = Args(**ns)
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-compile-"))
    try:
        for key in cases:
            bench_case(CASES[key], args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not KEEP_CACHE:
            shutil.rmtree(CACHE, ignore_errors=True)
    print(json.dumps({"inductor_cache": str(CACHE) if KEEP_CACHE else "cold", "threads": args.threads}))


if __name__ == "__main__":
    main()
