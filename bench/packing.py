"""Padding-free packing vs padded batches: training tokens/s through the real recipe (`build_recipe`,
LoRA, causal-LM SFT on chat records), measured in the same run on the same machine.

  padded  the baseline: dynamic padding to the longest example of a length-grouped batch (what every
          job does without `packing`), `batch_size` examples per micro-batch;
  packed  `packing: true`: examples packed into rows of up to max_seq_length tokens (block-diagonal
          attention through restarting position ids), `batch_size` rows per micro-batch;
  padded, same tokens  the baseline with `batch_size` x (examples per packed row): as many tokens per
          micro-batch as packing, so the two effects (no padding vs. bigger micro-batches) separate;
  padded, random  naive padding: random batches padded to their longest example, as a trainer without
          length grouping runs (Trainer's default, and the baseline of the published packing figures).

The length mix is log-normal, as chat data is: most examples short, a long tail up to max_seq_length.
Tokens are real (non-pad) tokens per CPU-second of the optimizer steps (one torch thread: the box may be
shared, and wall time would measure the neighbours); the first step of each run is warm-up and not
counted; runs alternate (ABC ABC ...) and the median per mode is reported. The ratio comes first.

    python bench/packing.py [--models tiny-lm,smollm2-135m] [--examples 2000] [--batch-size 8]
                            [--max-len 512] [--tokens 40000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TUNEHOUSE_DATA_DIR", str(ROOT / "data"))  # reuse built / converted base models
os.environ.setdefault("TUNEHOUSE_LOG_JSON", "false")
for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_TEXT = ("the a of to and in that it is was for on are with as be at by this have from or one had not but what "
         "all were when we there can an your which their said if do will each about how up out them then she "
         "many some so these would other into has more her two like him see time could no make than first been "
         "its who now people my made over did down only way find use may water long little very after words "
         "called just where most know get through back much before go good new write our used me man too any "
         "day same right look think also around another came come work three word must because does part")
WORDS = _TEXT.split()


class Hooks:
    """The recipe's hooks, doing nothing; checkpoints are thrown away."""

    def message(self, text: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        pass

    def metrics(self, step: int, values: dict[str, float]) -> None:
        pass

    def progress(self, step: int, total_steps: int, epoch: float, trained_tokens: int) -> None:
        pass

    def interrupted(self) -> None:
        return None

    def checkpoint(self, local_dir: Path, info: Any) -> None:
        shutil.rmtree(local_dir, ignore_errors=True)


def timed_steps(recipe: Any) -> list[tuple[int, float]]:
    """(tokens, CPU seconds) of each optimizer step the recipe takes from now on. CPU time of this process,
    not wall time: the box is shared, and with one torch thread it is the step's compute."""
    steps: list[tuple[int, float]] = []
    inner = recipe._train_step

    def step(*args: Any) -> Any:
        t0 = time.process_time()
        result = inner(*args)
        steps.append((int(getattr(result, "tokens", 0)), time.process_time() - t0))
        return result

    recipe._train_step = step
    return steps


def chat_records(n: int, seed: int, mean_words: float) -> list[dict[str, Any]]:
    """Chat examples whose lengths follow a log-normal mix (median ~`mean_words` words, long tail)."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        words = max(8, int(r.lognormvariate(math.log(mean_words), 0.8)))
        prompt = max(3, int(words * r.uniform(0.2, 0.6)))
        rows.append({"messages": [
            {"role": "user", "content": " ".join(r.choice(WORDS) for _ in range(prompt))},
            {"role": "assistant", "content": " ".join(r.choice(WORDS) for _ in range(words - prompt))},
        ]})
    return rows


def random_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Seeded shuffle, no length grouping: the naive baseline's batches."""
    order = list(range(len(lengths)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def run(model: str, train: Path, packing: bool, batch_size: int, args: argparse.Namespace,
        tokens_per_step: float, grouped: bool = True) -> tuple[float, list[int]]:
    """tokens/s of one run (first step excluded) and the example lengths it trained on."""
    from app.models_registry.catalog import local_base
    from ml.config import RecipeConfig
    from ml.training import build_recipe
    from ml.training import data as D

    grouping = D.epoch_batches

    steps = max(3, math.ceil(args.tokens / tokens_per_step) + 1)
    cfg = RecipeConfig.model_validate({
        "base_model": model, "task": "causal_lm", "training_type": {"type": "lora"}, "seed": 3, "n_epochs": 1,
        "batch_size": batch_size, "learning_rate": 1e-4, "max_seq_length": args.max_len, "max_steps": steps,
        "training_file_key": "bench", "packing": packing, "log_every_steps": 1})
    work = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    recipe = build_recipe(cfg, Hooks(), workdir=work, train_path=train, valid_path=None, resume_dir=None,
                          init_dir=None, base=local_base(model), device="cpu")
    try:
        recipe.setup()
        steps = timed_steps(recipe)
        D.epoch_batches = grouping if grouped else random_batches  # type: ignore[assignment]
        recipe.train()
        lengths = [len(e.input_ids) for e in recipe.train_set]
    finally:
        D.epoch_batches = grouping  # type: ignore[assignment]
        recipe.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    counted = steps[1:]  # the first step warms up
    return sum(t for t, _ in counted) / max(1e-9, sum(s for _, s in counted)), lengths


def bench_model(model: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from ml.data.packing import pack_rows

    train = tmp / f"{model}.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in chat_records(args.examples, 7, args.median_words)))
    _, lengths = run(model, train, False, 1, argparse.Namespace(**{**vars(args), "tokens": 0}), 1.0)
    mean = statistics.fmean(lengths)
    per_row = len(lengths) / len(pack_rows(lengths, args.max_len))
    same_tokens = max(args.batch_size + 1, round(args.batch_size * per_row))
    modes = {"padded": (False, args.batch_size, mean * args.batch_size, True),
             "packed": (True, args.batch_size, mean * per_row * args.batch_size, True),
             "padded_same_tokens": (False, same_tokens, mean * same_tokens, True),
             "padded_random": (False, args.batch_size, mean * args.batch_size, False)}
    speeds: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for name, (packing, batch, per_step, grouped) in modes.items():
            speeds[name].append(run(model, train, packing, batch, args, per_step, grouped)[0])
    q = statistics.quantiles(lengths, n=10)
    return {"model": model, "speeds": {m: statistics.median(v) for m, v in speeds.items()}, "runs": speeds,
            "mean": mean, "p10": q[0], "p50": statistics.median(lengths), "p90": q[-1], "max": max(lengths),
            "per_row": per_row, "same_tokens_batch": same_tokens, "waste": padding_waste(lengths, args)}


def padding_waste(lengths: list[int], args: argparse.Namespace) -> dict[str, float]:
    """Pad tokens computed per real token: length-grouped batches (the baseline), random batches (naive
    padding, for context) and packed rows (each batch pads its rows to the longest)."""
    from ml.data.packing import pack_rows, row_lengths
    from ml.training.data import epoch_batches

    def waste(batches: list[list[int]], lens: list[int]) -> float:
        return sum(len(b) * max(lens[i] for i in b) for b in batches) / sum(lens) - 1

    order = list(range(len(lengths)))
    random.Random(1).shuffle(order)
    rows = row_lengths(pack_rows(lengths, args.max_len), lengths)
    return {"grouped": waste(epoch_batches(lengths, args.batch_size, 3, 0), lengths),
            "random": waste([order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)], lengths),
            "packed": waste(epoch_batches(rows, args.batch_size, 3, 0), rows)}


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    ratios = ", ".join(f"{r['model']} {r['speeds']['packed'] / r['speeds']['padded']:.2f}x" for r in results)
    naive = ", ".join(f"{r['model']} {r['speeds']['packed'] / r['speeds']['padded_random']:.2f}x" for r in results)
    print(f"packed / padded training tokens per CPU-second (same batch_size {args.batch_size}): "
          f"vs length-grouped padding (the strongest baseline, every job's default) {ratios}; "
          f"vs naive random-batch padding {naive}")
    for r in results:
        s, same = r["speeds"], r["same_tokens_batch"]
        print(f"\n{r['model']}: {args.examples} chat examples, tokens p10 {r['p10']:.0f} / median {r['p50']:.0f} / "
              f"p90 {r['p90']:.0f} / max {r['max']} (mean {r['mean']:.0f}); {r['per_row']:.2f} examples per "
              f"packed row of {args.max_len}")
        lines = [(f"padded, length-grouped, batch {args.batch_size}", s["padded"], ""),
                 (f"packed, batch {args.batch_size} rows", s["packed"], f"{s['packed'] / s['padded']:.2f}x"),
                 (f"padded, batch {same} (packed's tokens/step)", s["padded_same_tokens"],
                  f"packed is {s['packed'] / s['padded_same_tokens']:.2f}x"),
                 (f"padded, random batches of {args.batch_size} (naive)", s["padded_random"],
                  f"packed is {s['packed'] / s['padded_random']:.2f}x")]
        for label, speed, note in lines:
            print(f"  {label:<44} {speed:>9.0f} tok/s  {note}")
        w = r["waste"]
        print(f"  pad tokens per real token: length-grouped {w['grouped']:.1%}, packed {w['packed']:.1%} "
              f"(random batches would pad {w['random']:.1%})")
        print("  runs: " + "; ".join(f"{m} " + ", ".join(f"{v:.0f}" for v in vs) for m, vs in r["runs"].items()))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny-lm", help="comma-separated catalog ids (smollm2-135m is slow on CPU)")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--median-words", type=float, default=45.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--tokens", type=int, default=40_000, help="tokens trained per measured run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def main() -> None:
    args = parse()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
        results = [bench_model(m.strip(), args, Path(tmp)) for m in args.models.split(",") if m.strip()]
    report(results, args)


if __name__ == "__main__":
    main()
