"""Step and time budgets (`max_steps`, `max_train_seconds`), the mean pooling of sentence-transformers
bases, and the honest report for a masked-LM job whose base ships no masked-LM head."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from app.models_registry.catalog import get_spec, local_base
from ml import evaluation as ev
from ml.config import Interrupt, Task
from ml.modeling import MeanPooling, load_task_model, load_tokenizer, sentence_transformers_pooling
from tests.ml.training import datasets as ds
from tests.ml.training.conftest import Run, at_step, make_cfg
from tests.ml.training.test_control import assert_same_weights, state_of

RunRecipe = Callable[..., Run]


def _sentiment(tmp_path: Path, n: int = 24) -> tuple[Path, Path]:
    rows = ds.sentiment_rows(n)
    return ds.write_jsonl(tmp_path / "train.jsonl", rows), ds.write_jsonl(tmp_path / "valid.jsonl", rows[:6])


def test_max_steps_ends_successfully_and_resumes_exactly(tmp_path: Path, run_recipe: RunRecipe) -> None:
    train, valid = _sentiment(tmp_path)
    cfg = make_cfg("tiny-lm", "classification", "lora", n_epochs=3, batch_size=4, max_steps=7)
    full = run_recipe(cfg, train, valid)
    out, hooks = full.outcome, full.hooks
    assert out.completed and not out.stopped_early and out.step == full.recipe.total_steps == 7
    assert full.recipe.steps_per_epoch == 6  # so the budget ends mid-epoch 2
    assert hooks.checkpoints[-1][1].step == 7 and hooks.eval_metrics[-1][0] == 7
    assert hooks.progress_calls[-1][:2] == (7, 7)
    assert any("budget reached at step 7" in text for _, text in hooks.messages)
    assert hooks.train_metrics[-1][1]["lr"] == pytest.approx(1e-3 / 7)  # the schedule fits the budget
    paused = run_recipe(cfg, train, valid, interrupt=at_step(3, Interrupt.paused))
    resumed = run_recipe(cfg, train, valid, resume_dir=paused.hooks.checkpoints[-1][0])
    assert resumed.outcome.completed and resumed.outcome.step == 7
    assert_same_weights(state_of(full), state_of(resumed))


def test_time_budget_stops_after_a_step(tmp_path: Path, run_recipe: RunRecipe) -> None:
    train, valid = _sentiment(tmp_path)
    run = run_recipe(make_cfg("tiny-lm", "classification", "full", max_train_seconds=1e-6), train, valid)
    assert run.outcome.completed and run.outcome.step == 1 < run.recipe.total_steps
    ckpt, info = run.hooks.checkpoints[-1]
    assert info.step == 1 and "valid_loss" in info.metrics
    state = json.loads((ckpt / "training_state" / "trainer_state.json").read_text())
    assert state["loop_seconds"] > 0  # carried across a resume


def test_mean_pooling_from_the_sentence_transformers_config(tmp_path: Path) -> None:
    base = local_base("minilm-l6").path
    assert sentence_transformers_pooling(base) == "mean"
    assert sentence_transformers_pooling(local_base("tiny-lm").path) is None
    tok = load_tokenizer(base)
    model = load_task_model(Task.classification, base, tok, ["a", "b"]).eval()
    assert isinstance(model.base_model.pooler, MeanPooling) and model.config.tunehouse_pooling == "mean"
    texts = ["a short one", "a much longer sentence, with padding needed for the short one"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = [model(**{k: v for k, v in tok(t, return_tensors="pt").items() if k != "token_type_ids"}).logits
                 for t in texts]
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)  # padding is not averaged
    model.save_pretrained(tmp_path)  # a saved full model records its pooling ...
    assert json.loads((tmp_path / "config.json").read_text())["tunehouse_pooling"] == "mean"
    again = load_task_model(Task.classification, tmp_path, tok, ["a", "b"])  # ... and is loaded with it
    assert isinstance(again.base_model.pooler, MeanPooling)
    tiny = local_base("tiny-lm").path
    decoder = load_task_model(Task.classification, tiny, load_tokenizer(tiny), ["a", "b"])
    assert decoder.config.tunehouse_pooling == "cls"  # last-token pooling is the decoder's own


def test_masked_lm_without_a_pretrained_head_says_so(tmp_path: Path, run_recipe: RunRecipe) -> None:
    assert get_spec("minilm-l6").new_head("masked_lm") and not get_spec("tiny-lm").new_head("causal_lm")
    rows = ds.text_rows(12)
    train, valid = ds.write_jsonl(tmp_path / "t.jsonl", rows), ds.write_jsonl(tmp_path / "v.jsonl", rows[:4])
    run = run_recipe(make_cfg("minilm-l6", "masked_lm", "lora", n_epochs=1), train, valid)
    warnings = [text for level, text in run.hooks.messages if level == "warn"]
    assert any("no pretrained masked_lm head" in text for text in warnings)
    report = ev.build_report(run.recipe, "file-v")
    assert report is not None
    assert report["metrics"]["base"] == {"head": "new"} and report["delta"] == {}
    assert "perplexity" in report["metrics"]["fine_tuned"]
    assert "no pretrained masked_lm head" in ev.summary(report)
