"""The end-of-job evaluation report (ml/evaluation.py) and the job's `cleaning` option applied in
the recipe's data loading (ml/training/data.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from app.models_registry.catalog import local_base
from ml import evaluation as ev
from ml.config import Interrupt, Task
from ml.data.cleaning import CleaningOptions, clean_records
from ml.data.formats import normalize
from ml.modeling import forward_logits, trainable_parameters
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
    out = ev.score(recipe.model, recipe.eval_batches(), recipe.task, recipe.device, 2, label_names=recipe.label_names)
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
    again = ev.score(run.recipe.model, run.recipe.eval_batches(), Task.classification, run.recipe.device, 2,
                     label_names=run.recipe.label_names)
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
    assert set(base) == set(tuned) == {"valid_loss", "perplexity", "exact_match", "format_match"}
    assert tuned["perplexity"] < base["perplexity"] / 10  # tiny-lm's base is random: ~vocabulary size
    assert report["delta"]["valid_loss"] < 0 and report["generated_examples"] == 8
    assert {tuned["valid_loss"], tuned["perplexity"]} == set(run.hooks.eval_metrics[-1][1].values())


def json_chats(n: int, seed: int) -> list[dict[str, Any]]:
    """Chats whose assistant always replies with the same JSON object: tiny-lm learns it in seconds."""
    rows = ds.chat_rows(n, seed)
    for row in rows:
        row["messages"][-1]["content"] = '{"ok": true}'
    return rows


def test_causal_lm_report_generated_answers(run_recipe: RunRecipe, tmp_path: Path) -> None:
    train, valid = _files(tmp_path, json_chats(24, 5), json_chats(8, 1))
    run = run_recipe(make_cfg("tiny-lm", "causal_lm", "full", learning_rate=3e-3, n_epochs=12), train, valid)
    report = ev.build_report(run.recipe, "file-v")
    assert report is not None and report["generated_examples"] == 8
    base, tuned = report["metrics"]["base"], report["metrics"]["fine_tuned"]
    assert base["exact_match"] == base["format_match"] == 0.0  # a random model says no JSON
    assert tuned["format_match"] >= 0.75 and tuned["exact_match"] >= 0.75
    assert report["delta"]["format_match"] == tuned["format_match"]
    assert "format_match 0 -> " in ev.summary(report) and "(not better)" not in ev.summary(report)
    # interrupted while generating: no report, and generation stops at once
    calls = run.hooks.interrupted_calls
    run.hooks.interrupt = lambda h: Interrupt.cancelled if h.interrupted_calls > calls + 3 else None
    assert ev.build_report(run.recipe, "file-v") is None
    assert run.hooks.interrupted_calls < calls + 20


@pytest.mark.parametrize("kind", ["lora", "prompt_tuning", "freeze"])
def test_generation_is_the_training_forwards_greedy(kind: str, tmp_path: Path) -> None:
    """The serving decoder (KV cache; prompt tuning's virtual tokens as embeddings) answers what
    step-by-step argmax over the training forward answers. The trainable weights are pushed far from
    their start so that the adapter or head decides the answer (tiny-lm's prompt tuning only nudges
    the logits: `test_smollm2.py` checks that path on a model it changes)."""
    train, valid = _files(tmp_path, json_chats(8, 5), json_chats(4, 1))
    cfg = make_cfg("tiny-lm", "causal_lm", kind)
    recipe = build_recipe(cfg, FakeHooks(tmp_path), workdir=tmp_path, train_path=train, valid_path=valid,
                          resume_dir=None, init_dir=None, base=local_base(cfg.base_model))
    recipe.setup()
    torch.manual_seed(0)
    with torch.no_grad():
        for _, param in trainable_parameters(recipe.model):
            param.add_(torch.randn_like(param))
    prompts = ev.generation_prompts(recipe, recipe.eval_batches())
    assert len(prompts) == 4 and all(ev._decode(recipe.tokenizer, p.reference).startswith('{"ok"') for p in prompts)
    answers = ev.greedy_answers(recipe.model, recipe.tokenizer, prompts, recipe.device, lambda: None)
    assert answers == [_argmax_answer(recipe, p) for p in prompts]
    assert recipe.model.training  # left as it was
    base = ev.greedy_answers(ev.base_model(recipe), recipe.tokenizer, prompts, recipe.device, lambda: None)
    assert (answers != base) == (kind != "prompt_tuning")


@torch.no_grad()
def _argmax_answer(recipe: Any, prompt: ev.GenPrompt) -> str:
    ids, eos = list(prompt.ids), ev._eos_ids(recipe.model, recipe.tokenizer)
    recipe.model.eval()
    for _ in range(len(prompt.reference) + ev.GENERATION_MARGIN):
        batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        token = int(forward_logits(recipe.model, batch, Task.causal_lm)[0, -1].argmax())
        if token in eos:
            break
        ids.append(token)
    recipe.model.train()
    return str(recipe.tokenizer.decode(ids[len(prompt.ids):], skip_special_tokens=True))


def test_last_span_and_answer_metrics() -> None:
    x = -100
    assert ev.last_span([x, x, 5, 6, x, x, 7, 8, 9]) == (6, 9)  # the last assistant turn
    assert ev.last_span([x, 5, 6, x]) == (1, 3)
    assert ev.last_span([5, 6, 7]) is None  # plain text: nothing to prompt with
    assert ev.last_span([x, x]) is None
    ref = '{"answer": "Lima", "confidence": "high"}'
    assert ev.same_format('{"confidence": "low", "answer": "Quito"}', ref)  # keys, not values or order
    assert not ev.same_format('{"answer": "Lima"}', ref)
    assert not ev.same_format('The capital of Peru is Lima.', ref)
    assert not ev.same_format('{"answer": "Lima", "confidence": "high"', ref)  # cut short: not JSON
    assert ev.same_format("[3]", "[1, 2]") and not ev.same_format('{"a": 1}', "[1, 2]")
    assert ev.same_format("The sky is grey.", "The sky is blue.") and not ev.same_format("Blue.", "The sky")
    assert ev.same_format("", "") and not ev.same_format("", "Paris")
    assert ev.exact_match(" The  sky\nis blue. ", "The sky is blue.") and not ev.exact_match("the sky", "The sky")
    assert ev.answer_metrics([ref, "Lima", '{"answer": "x", "confidence": "y"}'], [ref] * 3) == {
        "exact_match": 1 / 3, "format_match": 2 / 3}


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
