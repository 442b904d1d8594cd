"""The `auto` defaults train a useful model on real data: minilm-l6 with every hyperparameter left to
`auto` (as a job body without hyperparameters resolves them) on a small subset of the imbalanced SMS
spam set, scored by the recipe's own validation pass. A majority-class model (macro-F1 ~0.46, spam
recall 0) is the failure this guards against. Only settings that don't shape the optimisation are trimmed
for time: 64-token texts, one evaluation and one checkpoint at the end. `bench/quality.py` measures the
same thing at scale."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app.jobs import hyperparams
from app.models_registry.catalog import get_spec
from ml.config import RecipeConfig, Task, TrainingKind, TrainingTypeConfig
from tests.ml.training import datasets as ds
from tests.ml.training.conftest import Run

DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"  # <repo>/../shared/data
TRAIN_N, VALID_N = 160, 150


def _subset(name: str, n: int) -> list[dict[str, Any]]:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"real datasets not found at {DATA} (needs {name})")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(rows)
    return rows[:n]


def _default_cfg(kind: TrainingKind, n_examples: int) -> RecipeConfig:
    spec = get_spec("minilm-l6")
    auto = hyperparams.resolve(spec, kind, n_examples, "auto", "auto", "auto", None)
    return RecipeConfig(
        base_model=spec.id, task=Task.classification, training_type=TrainingTypeConfig(type=kind), seed=0,
        n_epochs=int(auto["n_epochs"]), batch_size=int(auto["batch_size"]),
        learning_rate=float(auto["learning_rate"]), max_seq_length=64, training_file_key="sms_spam_train.jsonl",
        eval_every_steps=10**6, checkpoint_every_steps=10**6,  # both once, at the end
    )


@pytest.mark.parametrize("kind", [TrainingKind.lora, TrainingKind.freeze])
def test_defaults_beat_the_majority_class(kind: TrainingKind, run_recipe: Callable[..., Run],
                                          tmp_path: Path) -> None:
    train = ds.write_jsonl(tmp_path / "train.jsonl", _subset("sms_spam_train.jsonl", TRAIN_N))
    valid = ds.write_jsonl(tmp_path / "valid.jsonl", _subset("sms_spam_test.jsonl", VALID_N))
    run = run_recipe(_default_cfg(kind, TRAIN_N), train, valid)
    metrics = run.hooks.eval_metrics[-1][1]
    print(f"\nsms_spam {TRAIN_N} examples, minilm-l6 {kind} defaults ({run.recipe.cfg.learning_rate:g}): "
          f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}, "
          f"recall ham {metrics['recall_ham']:.3f} spam {metrics['recall_spam']:.3f} in {run.seconds:.0f} s")
    assert run.outcome.completed
    assert metrics["macro_f1"] >= 0.8  # a majority-class model scores ~0.46
    assert metrics["recall_spam"] >= 0.6 and metrics["recall_ham"] >= 0.9
