"""The end-of-job evaluation report (ml/evaluation.py) and the job's `cleaning` option applied in
the recipe's data loading (ml/training/data.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app.models_registry.catalog import local_base
from ml import evaluation as ev
from ml.config import Interrupt, Task
from ml.data.cleaning import CleaningOptions, clean_records
from ml.data.formats import normalize
from ml.training import build_recipe
from tests.ml.training import datasets as ds
from tests.ml.training.conftest import FakeHooks, Run, make_cfg

RunRecipe = Callable[..., Run]


def _files(tmp_path: Path, train: list[dict[str, Any]], valid: list[dict[str, Any]]) -> tuple[Path, Path]:
    return ds.write_jsonl(tmp_path / "train.jsonl", train), ds.write_jsonl(tmp_path / "valid.jsonl", valid)


def _fresh_model_metrics(cfg: Any, train: Path, valid: Path, tmp_path: Path) -> dict[str, float]:
    """Scores of the job's own starting point (set up, not trained)."""
    recipe = build_recipe(cfg, FakeHooks(tmp_path), workdir=tmp_path, train_path=train, valid_path=valid,
                          resume_dir=None, init_dir=None, base=local_base(cfg.base_model))
    recipe.setup()
    out = ev.score(recipe.model, recipe.eval_batches(), recipe.task, recipe.device, 2)
    assert out is not None
    return out


def test_classification_report_side_by_side(run_recipe: RunRecipe, tmp_path: Path) -> None:
    train, valid = _files(tmp_path, ds.sentiment_rows(48), ds.sentiment_rows(24, seed=9))
    cfg = make_cfg("tiny-lm", "classification", "lora", learning_rate=2e-2, n_epochs=4)
    run = run_recipe(cfg, train, valid)
    report = ev.build_report(run.recipe, "file-valid")
    assert report is not None
    base, tuned = report["metrics"]["base"], report["metrics"]["fine_tuned"]
    assert tuned == run.hooks.eval_metrics[-1][1]  # the job's own last validation metrics
    assert set(base) == set(tuned) == {"valid_loss", "accuracy", "macro_f1", "precision", "recall",
                                       "recall_negative", "recall_positive"}
    assert tuned["accuracy"] >= 0.9 and tuned["accuracy"] > base["accuracy"]
    assert report["delta"]["accuracy"] == pytest.approx(tuned["accuracy"] - base["accuracy"])
    assert report["validation_file"] == "file-valid" and report["validation_examples"] == 24
    # same batches, same numbers: scoring the trained model again reproduces the recipe's evaluation
    again = ev.score(run.recipe.model, run.recipe.eval_batches(), Task.classification, run.recipe.device, 2)
    assert again == pytest.approx(tuned)
    # "base" is exactly the fresh head the job started from (LoRA starts as the identity)
    assert _fresh_model_metrics(cfg, train, valid, tmp_path / "fresh") == pytest.approx(base)
    text = ev.summary(report)
    assert text.startswith("Evaluation on file-valid (base -> fine-tuned): valid_loss ")


def test_causal_lm_report_perplexity(run_recipe: RunRecipe, tmp_path: Path) -> None:
    train, valid = _files(tmp_path, ds.chat_rows(24), ds.chat_rows(8, seed=1))
    run = run_recipe(make_cfg("tiny-lm", "causal_lm", "full", learning_rate=1e-2, n_epochs=3), train, valid)
    report = ev.build_report(run.recipe, "file-v")
    assert report is not None
    base, tuned = report["metrics"]["base"], report["metrics"]["fine_tuned"]
    assert set(base) == {"valid_loss", "perplexity"}
    assert tuned["perplexity"] < base["perplexity"] / 10  # tiny-lm's base is random: ~vocabulary size
    assert report["delta"]["valid_loss"] < 0


def test_regression_report_and_no_validation(run_recipe: RunRecipe, tmp_path: Path) -> None:
    train, valid = _files(tmp_path, ds.regression_rows(32), ds.regression_rows(12, seed=4))
    cfg = make_cfg("tiny-lm", "regression", "lora", learning_rate=2e-2, n_epochs=2)
    report = ev.build_report(run_recipe(cfg, train, valid).recipe, "f")
    assert report is not None and {"mse", "mae"} <= set(report["metrics"]["base"])
    assert ev.build_report(run_recipe(cfg, train).recipe, None) is None


def test_failure_and_interrupt_only_cost_the_report(run_recipe: RunRecipe, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    train, valid = _files(tmp_path, ds.sentiment_rows(16), ds.sentiment_rows(8, seed=9))
    run = run_recipe(make_cfg("tiny-lm", "classification", "freeze", n_epochs=1), train, valid)

    def broken(recipe: Any) -> Any:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(ev, "base_model", broken)
    assert ev.safe_report(run.recipe, "f", run.hooks) is None
    assert run.hooks.messages[-1] == ("warn", "Evaluation report skipped: RuntimeError: out of memory")
    monkeypatch.undo()
    run.recipe.progress.last_eval_step = -1  # force re-scoring the fine-tuned model ...
    run.hooks.interrupt = lambda h: Interrupt.cancelled  # ... while the job is being cancelled
    assert ev.build_report(run.recipe, "f") is None


class DataHooks(FakeHooks):
    def __init__(self, store: Path) -> None:
        super().__init__(store)
        self.data: list[dict[str, Any]] = []

    def message(self, text: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        super().message(text, level, data)
        self.data.append(data or {})


def test_job_cleaning_in_data_loading(tmp_path: Path) -> None:
    some = ds.sentiment_rows(40)
    rows = [*some, *some[:5], {"text": "Mail ann@example.com. Great!", "label": "positive"}]
    valid = [{"text": "Write to bob@example.com, terrible.", "label": "negative"}] * 2
    train, valid_path = _files(tmp_path, rows, valid)
    options = {"dedupe": True, "near_dedupe": False, "drop_empty": True, "max_chars": None, "scrub_pii": True}
    cfg = make_cfg("tiny-lm", "classification", "lora", n_epochs=1, cleaning=options)
    hooks = DataHooks(tmp_path)
    recipe = build_recipe(cfg, hooks, workdir=tmp_path, train_path=train, valid_path=valid_path,
                          resume_dir=None, init_dir=None, base=local_base(cfg.base_model))
    recipe.setup()
    expected, report = clean_records([normalize(r)[1] for r in rows], CleaningOptions.model_validate(options))
    assert report.removed["exact_duplicates"] == 5
    assert len(recipe.train_set) == len(expected) < len(rows)
    cleaned = [d for d in hooks.data if "cleaning" in d]
    assert [d["file"] for d in cleaned] == ["training", "validation"]
    assert cleaned[0]["cleaning"] == report.as_dict() and cleaned[0]["cleaning"]["scrubbed"]["email"] == 1
    # validation rows are only scrubbed (never dropped): both identical rows stay
    assert cleaned[1]["cleaning"]["output_rows"] == 2 and cleaned[1]["cleaning"]["scrubbed"]["email"] == 2
    assert len(recipe.valid_set) == 2
    assert any(text.startswith("Cleaned the training data: ") for _, text in hooks.messages)
