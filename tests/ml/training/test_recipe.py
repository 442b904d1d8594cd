"""Every task x training type trains (loss goes down), writes the documented checkpoint layout and
serves (loaded by the inference engine) with the trained model's outputs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from ml.checkpoint import CheckpointInfo, read_info
from ml.modeling import forward_logits
from tests.ml.served import Served, rows
from tests.ml.training import datasets as ds
from tests.ml.training.conftest import Run, loss_drop, make_cfg

STATE_FILES = {
    "optimizer.safetensors",
    "optimizer.json",
    "scheduler.json",
    "rng.safetensors",
    "trainer_state.json",
}
LR = {  # per (model, kind): tiny-lm is randomly initialised, minilm is pretrained
    ("tiny-lm", "full"): 1e-2,
    ("tiny-lm", "lora"): 2e-2,
    ("tiny-lm", "freeze"): 2e-2,
    ("tiny-lm", "prompt_tuning"): 0.3,
    ("minilm-l6", "full"): 1e-4,
    ("minilm-l6", "lora"): 3e-3,
    ("minilm-l6", "freeze"): 1e-2,
    ("minilm-l6", "prompt_tuning"): 3e-2,
}
ROWS: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "chat": ds.chat_rows,
    "prompt_completion": ds.prompt_completion_rows,
    "text": ds.text_rows,
    "sentiment": lambda: ds.sentiment_rows(32),
    "regression": lambda: ds.regression_rows(32),
}
KINDS = ["full", "lora", "freeze", "prompt_tuning"]
CASES = (
    [pytest.param("tiny-lm", "causal_lm", k, "chat", id=f"tiny-causal-chat-{k}") for k in KINDS]
    + [
        pytest.param("tiny-lm", "causal_lm", "full", d, id=f"tiny-causal-{d}")
        for d in ("prompt_completion", "text")
    ]
    + [pytest.param("tiny-lm", "classification", k, "sentiment", id=f"tiny-cls-{k}") for k in KINDS]
    + [pytest.param("tiny-lm", "regression", "lora", "regression", id="tiny-reg-lora")]
    + [
        pytest.param(
            "minilm-l6",
            "classification",
            k,
            "sentiment",
            id=f"minilm-cls-{k}",
            marks=[pytest.mark.slow] if k == "full" else [],
        )
        for k in KINDS
    ]
    + [
        pytest.param(
            "minilm-l6",
            "regression",
            k,
            "regression",
            id=f"minilm-reg-{k}",
            marks=[pytest.mark.slow] if k == "full" else [],
        )
        for k in KINDS
    ]
    + [
        pytest.param(
            "minilm-l6",
            "masked_lm",
            k,
            "text",
            id=f"minilm-mlm-{k}",
            marks=[pytest.mark.slow] if k == "full" else [],
        )
        for k in KINDS
    ]
)


def check_layout(ckpt: Path, kind: str, task: str) -> None:
    names = {p.name for p in ckpt.iterdir()}
    assert "tunehouse.json" in names and "tokenizer_config.json" in names
    assert "tokenizer.json" in names or "vocab.txt" in names
    if kind in ("lora", "prompt_tuning"):
        assert {
            "adapter_config.json",
            "adapter_model.safetensors",
        } <= names and "model.safetensors" not in names
        if task in ("classification", "regression"):  # the trained head travels with the adapter
            with safe_open(str(ckpt / "adapter_model.safetensors"), "pt") as f:
                assert any(k.split(".")[-2] in ("classifier", "score") for k in f.keys())  # noqa: SIM118
    else:
        assert {"config.json", "model.safetensors"} <= names and "adapter_config.json" not in names
    assert set(p.name for p in (ckpt / "training_state").iterdir()) == STATE_FILES
    assert not [p for p in ckpt.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".pth")]
    info = json.loads((ckpt / "tunehouse.json").read_text())
    assert info["task"] == task and info["training_type"] == kind


def check_inference(run: Run, ckpt: Path, info: CheckpointInfo) -> None:
    assert read_info(ckpt) == info  # every field round-trips through tunehouse.json
    trained, task = run.recipe.model.eval(), run.recipe.task
    with Served(ckpt, task.value) as served, torch.no_grad():
        for ids in rows(run.recipe.eval_batches()[0]):
            want = forward_logits(trained, {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]}, task)
            torch.testing.assert_close(served.logits(ids.tolist()), want[0].float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("model_id", "task", "kind", "data"), CASES)
def test_trains_and_checkpoints(
    model_id: str, task: str, kind: str, data: str, tmp_path: Path, run_recipe: Callable[..., Run]
) -> None:
    rows = ROWS[data]()
    train = ds.write_jsonl(tmp_path / "train.jsonl", rows)
    valid = ds.write_jsonl(tmp_path / "valid.jsonl", rows[:8])
    epochs = 4 if model_id == "tiny-lm" else 3
    cfg = make_cfg(
        model_id, task, kind, learning_rate=LR[(model_id, kind)], n_epochs=epochs, warmup_ratio=0.1
    )
    run = run_recipe(cfg, train, valid)
    out, hooks = run.outcome, run.hooks
    first, last = loss_drop(hooks.losses)
    print(
        f"\n{model_id} {task}/{data} {kind}: loss {first:.3f} -> {last:.3f}, steps {out.step}, "
        f"valid {hooks.eval_metrics[-1][1]}, {run.seconds:.1f}s"
    )
    assert out.completed and out.step == run.recipe.total_steps and out.trained_tokens > 0
    assert last < first
    assert len(hooks.checkpoints) == epochs and [i.step for _, i in hooks.checkpoints][-1] == out.step
    assert len(hooks.eval_metrics) == epochs
    assert {"train_loss", "lr", "tokens_per_second", "epoch"} <= set(hooks.train_metrics[0][1])
    assert hooks.progress_calls[-1][:2] == (out.step, out.step)
    ckpt, info = hooks.checkpoints[-1]
    check_layout(ckpt, kind, task)
    assert "valid_loss" in info.metrics and "train_loss" in out.final_metrics
    if task == "classification":
        assert info.label_names == ["negative", "positive"]
        assert {"accuracy", "macro_f1", "precision", "recall"} <= set(out.final_metrics)
    check_inference(run, ckpt, info)
