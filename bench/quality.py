"""Do the defaults train good models? Fine-tunes a base model on real labelled text (../shared/data:
subjectivity, customer reviews, imbalanced SMS spam) with every hyperparameter left to `auto`, and
with a small sweep of learning rates at the same budget (same epochs, batch size, data and seed),
then scores each on the held-out test split: accuracy, macro-F1 and per-class recall. Per (dataset,
method) it prints the gap between the defaults and the best sweep point in points of macro-F1, then a
summary table; a default that predicts a single class is flagged.

    python bench/quality.py                                  # minilm-l6, lora/full/freeze, 3 datasets
    python bench/quality.py --datasets sms_spam --methods lora --train-n 400 --lrs 1e-4,1e-3
    python bench/quality.py --results /tmp/quality.jsonl     # also append every run as JSON
    python bench/quality.py --results q.jsonl --cache q.jsonl  # reuse runs already recorded there

`--cache` reuses a recorded run with the same model, data subset, method, learning rate, epochs, batch
size and seed: training on CPU is deterministic, so it is the run this invocation would make (delete
the file after changing the training code).

Training goes through the service's own recipe (`ml.training.build_recipe`) and `auto` resolution
(`app.jobs.hyperparams.resolve`), exactly as a job with no hyperparameters would run. A benchmark,
not a test: minutes per (dataset, method) on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TUNEHOUSE_DATA_DIR", str(Path(tempfile.gettempdir()) / "tunehouse-bench-data"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from app.jobs import hyperparams
from app.models_registry.catalog import get_spec, local_base
from ml.checkpoint import CheckpointInfo
from ml.config import Interrupt, RecipeConfig, Task, TrainingKind, TrainingTypeConfig
from ml.modeling import forward_logits
from ml.training import build_recipe

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SWEEP: dict[str, list[float]] = {  # learning rates tried per method (the default is added)
    "lora": [3e-4, 1e-3, 3e-3],
    "full": [5e-5, 1e-4, 2e-4],
    "freeze": [1e-2, 3e-2, 1e-1],
    "prompt_tuning": [3e-3, 1e-2, 3e-2, 1e-1],
}


class QuietHooks:
    def message(self, text: str, level: str = "info", data: dict[str, Any] | None = None) -> None: ...
    def metrics(self, step: int, values: dict[str, float]) -> None: ...
    def progress(self, step: int, total_steps: int, epoch: float, trained_tokens: int) -> None: ...
    def interrupted(self) -> Interrupt | None:
        return None

    def checkpoint(self, local_dir: Path, info: CheckpointInfo) -> None:
        shutil.rmtree(local_dir, ignore_errors=True)


@dataclass
class Score:
    accuracy: float
    macro_f1: float
    recall: dict[str, float]
    seconds: float

    def line(self) -> str:
        recalls = " ".join(f"{k}={v:.3f}" for k, v in self.recall.items())
        return f"acc {self.accuracy:.3f}  macro-F1 {self.macro_f1:.3f}  recall {recalls}  ({self.seconds:.0f} s)"

    @property
    def single_class(self) -> bool:
        return sum(v > 0 for v in self.recall.values()) <= 1


@dataclass
class Row:
    dataset: str
    method: str
    default_lr: float
    default: Score
    best_lr: float
    best: Score

    @property
    def gap(self) -> float:
        return 100 * (self.best.macro_f1 - self.default.macro_f1)


def read(path: Path, n: int | None, seed: int) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    return rows[:n] if n else rows


def score(labels: list[str], gold: list[str], pred: list[str]) -> tuple[float, float, dict[str, float]]:
    g, p = np.array(gold), np.array(pred)
    recall = {c: float(((g == c) & (p == c)).sum() / max(1, (g == c).sum())) for c in labels}
    f1s = []
    for c in labels:
        tp = float(((g == c) & (p == c)).sum())
        prec = tp / max(1.0, float((p == c).sum()))
        f1s.append(0.0 if tp == 0 else 2 * prec * recall[c] / (prec + recall[c]))
    return float((g == p).mean()), float(np.mean(f1s)), recall


def predict(recipe: Any, texts: list[str], batch: int = 64) -> list[str]:
    names = recipe.label_names
    model, tok = recipe.model, recipe.tokenizer
    model.eval()
    out: list[str] = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i : i + batch], padding=True, truncation=True, max_length=recipe.cfg.max_seq_length,
                      return_tensors="pt")
            logits = forward_logits(model, {k: v for k, v in enc.items() if k != "token_type_ids"},
                                    Task.classification)
            out += [names[j] for j in logits.argmax(-1).tolist()]
    return out


def plan(model_id: str, kind: str, n: int, lr: float | None) -> RecipeConfig:
    """A job with `auto` epochs and batch size; `lr` None: the default learning rate too."""
    spec = get_spec(model_id)
    resolved = hyperparams.resolve(spec, TrainingKind(kind), n, "auto", "auto", "auto", lr)
    return RecipeConfig(
        base_model=model_id, task=Task.classification, training_type=TrainingTypeConfig(type=TrainingKind(kind)),
        seed=1234, n_epochs=int(resolved["n_epochs"]), batch_size=int(resolved["batch_size"]),
        learning_rate=float(resolved["learning_rate"]), max_seq_length=min(128, spec.max_seq_length),
        training_file_key="bench", checkpoint_every_steps=10**9, log_every_steps=10**9,
    )


def run(cfg: RecipeConfig, train: Path, test_rows: list[dict[str, Any]], workdir: Path) -> Score:
    t0 = time.perf_counter()
    recipe = build_recipe(cfg, QuietHooks(), workdir=workdir, train_path=train, valid_path=None, resume_dir=None,
                          init_dir=None, base=local_base(cfg.base_model), device="cpu")
    try:
        recipe.setup()
        recipe.train()
        pred = predict(recipe, [r["text"] for r in test_rows])
    finally:
        recipe.cleanup()
    acc, f1, recall = score(sorted({r["label"] for r in test_rows}), [r["label"] for r in test_rows], pred)
    return Score(acc, f1, recall, time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--datasets", default="subj,custrev,sms_spam")
    ap.add_argument("--methods", default="lora,full,freeze")
    ap.add_argument("--train-n", type=int, default=600, help="training examples (a seeded random subset)")
    ap.add_argument("--test-n", type=int, default=500, help="held-out examples scored")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--no-sweep", action="store_true", help="defaults only")
    ap.add_argument("--lrs", default="", help="comma-separated learning rates replacing the built-in sweep")
    ap.add_argument("--results", type=Path, help="append every run to this JSONL file")
    ap.add_argument("--cache", type=Path, help="reuse identical runs recorded in this JSONL file (see above)")
    args = ap.parse_args()
    args.cached = load_cache(args.cache)
    torch.set_num_threads(args.threads)
    if not DATA.is_dir():
        sys.exit(f"no datasets at {DATA}")
    print(f"model {args.model}, {args.train_n} training / {args.test_n} test examples, {args.threads} threads",
          flush=True)
    rows: list[Row] = []
    for name in args.datasets.split(","):
        train_rows = read(DATA / f"{name}_train.jsonl", args.train_n, seed=0)
        test = read(DATA / f"{name}_test.jsonl", args.test_n, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            train = Path(tmp) / "train.jsonl"
            train.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
            rows += [report(args, name, method, train, test, Path(tmp)) for method in args.methods.split(",")]
    summary(rows)


def sweep_lrs(args: argparse.Namespace, method: str, lr0: float) -> list[float]:
    if args.no_sweep:
        return []
    grid = [float(x) for x in args.lrs.split(",")] if args.lrs else SWEEP[method]
    return [lr for lr in grid if not np.isclose(lr, lr0)]


def report(args: argparse.Namespace, name: str, method: str, train: Path, test: list[dict[str, Any]],
           tmp: Path) -> Row:
    lr0 = plan(args.model, method, args.train_n, None).learning_rate
    results = [(lr, measure(args, name, plan(args.model, method, args.train_n, lr), train, test, tmp))
               for lr in [lr0, *sweep_lrs(args, method, lr0)]]
    default = results[0][1]
    best_lr, best = max(results, key=lambda r: r[1].macro_f1)
    row = Row(name, method, lr0, default, best_lr, best)
    majority = max(sum(r["label"] == c for r in test) for c in {r["label"] for r in test}) / len(test)
    flag = "  ** MAJORITY-CLASS MODEL **" if default.single_class else ""
    print(f"\n{name} / {method}: defaults {row.gap:+.1f} points of macro-F1 behind the best sweep point "
          f"(lr {best_lr:g}); majority-class accuracy {majority:.3f}{flag}")
    for lr, s in sorted(results, key=lambda r: r[0]):
        tag = "default" if lr == lr0 else "sweep  "
        print(f"  {tag} lr {lr:<8g} {s.line()}", flush=True)
    return row


def run_key(args: argparse.Namespace, name: str, cfg: RecipeConfig) -> dict[str, Any]:
    """Everything that decides a run's result (with the training code)."""
    return {"model": cfg.base_model, "dataset": name, "method": cfg.training_type.type.value,
            "lr": cfg.learning_rate, "train_n": args.train_n, "test_n": args.test_n, "n_epochs": cfg.n_epochs,
            "batch_size": cfg.batch_size, "seed": cfg.seed, "max_seq_length": cfg.max_seq_length}


def load_cache(path: Path | None) -> dict[str, Score]:
    if path is None or not path.exists():
        return {}
    out: dict[str, Score] = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        out[json.dumps(entry["key"], sort_keys=True)] = Score(**entry["score"])
    return out


def measure(args: argparse.Namespace, name: str, cfg: RecipeConfig, train: Path, test: list[dict[str, Any]],
            tmp: Path) -> Score:
    key = run_key(args, name, cfg)
    cached = args.cached.get(json.dumps(key, sort_keys=True))
    if cached is not None:
        return cached
    result = run(cfg, train, test, tmp)
    if args.results is not None:
        with args.results.open("a") as f:
            f.write(json.dumps({"key": key, "score": asdict(result)}) + "\n")
    return result


def summary(rows: list[Row]) -> None:
    print("\n| dataset | method | default lr | acc | macro-F1 | recall per class | best sweep lr | best macro-F1 "
          "| gap (points) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        recalls = " ".join(f"{k}={v:.2f}" for k, v in r.default.recall.items())
        print(f"| {r.dataset} | {r.method} | {r.default_lr:g} | {r.default.accuracy:.3f} | "
              f"{r.default.macro_f1:.3f} | {recalls} | {r.best_lr:g} | {r.best.macro_f1:.3f} | {r.gap:.1f} |")


if __name__ == "__main__":
    main()
