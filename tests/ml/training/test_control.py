"""Exact resume after a pause, cancel, early stopping, from_checkpoint init, data errors and a real
accuracy check on a small sentiment set."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from app.models_registry.catalog import local_base
from ml.config import Interrupt
from tests.ml.training import datasets as ds
from tests.ml.training.conftest import Run, at_call, at_step, make_cfg


def state_of(run: Run) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.recipe.model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
        worst = max(worst, (a[k].float() - b[k].float()).abs().max().item() if a[k].numel() else 0.0)
    return worst


RESUME_CASES = [
    # accumulation 2 + pause at an odd micro-batch: interrupted mid-accumulation
    pytest.param(
        "tiny-lm",
        "causal_lm",
        "lora",
        "chat",
        {"gradient_accumulation_steps": 2},
        at_call(7, Interrupt.paused),
        id="tiny-causal-lora-mid-accumulation",
    ),
    # packed rows (batches planned over rows) + gradient checkpointing, paused mid-accumulation
    pytest.param(
        "tiny-lm",
        "causal_lm",
        "lora",
        "chat",
        {"gradient_accumulation_steps": 2, "packing": True, "gradient_checkpointing": True, "max_seq_length": 128},
        at_call(7, Interrupt.paused),  # epoch 2, second micro-batch (after an evaluation)
        id="tiny-causal-lora-packed-checkpointed",
    ),
    pytest.param(
        "tiny-lm",
        "causal_lm",
        "freeze",
        "text",
        {"lr_scheduler": "cosine", "warmup_ratio": 0.2},
        at_step(4, Interrupt.paused),
        id="tiny-causal-freeze-mid-epoch",
    ),
    pytest.param(
        "tiny-lm",
        "classification",
        "prompt_tuning",
        "sentiment",
        {"checkpoint_every_steps": 2},
        at_step(5, Interrupt.paused),
        id="tiny-cls-prompt-tuning",
    ),
    pytest.param(
        "minilm-l6",
        "masked_lm",
        "lora",
        "text",
        {"gradient_accumulation_steps": 2},
        at_call(5, Interrupt.paused),
        id="minilm-mlm-lora-dropout",
    ),
]
ROWS: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "chat": ds.chat_rows,
    "text": ds.text_rows,
    "sentiment": lambda: ds.sentiment_rows(24),
}


@pytest.mark.parametrize(("model_id", "task", "kind", "data", "extra", "pause"), RESUME_CASES)
def test_pause_and_resume_is_exact(
    model_id: str,
    task: str,
    kind: str,
    data: str,
    extra: dict[str, Any],
    pause: Any,
    tmp_path: Path,
    run_recipe: Callable[..., Run],
) -> None:
    rows = ROWS[data]()
    train = ds.write_jsonl(tmp_path / "train.jsonl", rows)
    valid = ds.write_jsonl(tmp_path / "valid.jsonl", rows[:6])
    cfg = make_cfg(
        model_id,
        task,
        kind,
        n_epochs=2,
        batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.01,
        training_type={"lora_dropout": 0.2},
        **extra,
    )
    full = run_recipe(cfg, train, valid)
    paused = run_recipe(cfg, train, valid, interrupt=pause)
    assert not paused.outcome.completed and paused.outcome.interrupt is Interrupt.paused
    ckpt, info = paused.hooks.checkpoints[-1]
    assert info.step == paused.outcome.step and (ckpt / "training_state" / "trainer_state.json").exists()
    assert 0 < info.step < full.outcome.step
    resumed = run_recipe(cfg, train, valid, resume_dir=ckpt)
    assert resumed.outcome.completed and resumed.outcome.step == full.outcome.step
    worst = assert_same_weights(state_of(full), state_of(resumed))
    a, b = full.outcome.final_metrics, resumed.outcome.final_metrics
    print(
        f"\nresume {model_id} {task} {kind}: paused at step {info.step}/{full.outcome.step}, final loss "
        f"{a['train_loss']:.6f} vs {b['train_loss']:.6f}, max |dw| {worst:.2e}"
    )
    assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-6)
    assert b["valid_loss"] == pytest.approx(a["valid_loss"], abs=1e-6)
    # the resumed run logs exactly the uninterrupted run's remaining steps
    tail = [(s, m["train_loss"]) for s, m in full.hooks.train_metrics if s > info.step]
    got = [(s, m["train_loss"]) for s, m in resumed.hooks.train_metrics]
    assert [s for s, _ in got] == [s for s, _ in tail]
    assert [v for _, v in got] == pytest.approx([v for _, v in tail], abs=1e-6)
    assert resumed.outcome.trained_tokens == full.outcome.trained_tokens


def test_cancel_stops_within_a_step(tmp_path: Path, run_recipe: Callable[..., Run]) -> None:
    train = ds.write_jsonl(tmp_path / "train.jsonl", ds.chat_rows(24))
    cfg = make_cfg("tiny-lm", "causal_lm", "full", batch_size=2, gradient_accumulation_steps=3)
    run = run_recipe(cfg, train, interrupt=at_call(5, Interrupt.cancelled))  # 2nd micro-batch of step 2
    assert not run.outcome.completed and run.outcome.interrupt is Interrupt.cancelled
    assert run.outcome.step == 1 and run.hooks.interrupted_calls == 5
    assert run.hooks.checkpoints == []  # cancelled: no state saved
    lost = run_recipe(cfg, train, interrupt=at_step(2, Interrupt.lease_lost))
    assert lost.outcome.interrupt is Interrupt.lease_lost and lost.outcome.step == 2


def test_early_stopping(tmp_path: Path, run_recipe: Callable[..., Run]) -> None:
    rows = ds.sentiment_rows(32)
    flipped = [
        {"text": r["text"], "label": "negative" if r["label"] == "positive" else "positive"} for r in rows
    ]
    train = ds.write_jsonl(tmp_path / "train.jsonl", rows)
    valid = ds.write_jsonl(tmp_path / "valid.jsonl", flipped[:16])  # learning the task hurts validation
    cfg = make_cfg(
        "tiny-lm",
        "classification",
        "full",
        n_epochs=10,
        learning_rate=1e-2,
        eval_every_steps=2,
        early_stopping={"patience": 2, "min_delta": 0.0},
    )
    run = run_recipe(cfg, train, valid)
    out = run.outcome
    print(
        f"\nearly stopping at step {out.step} of {run.recipe.total_steps}; valid losses "
        f"{[round(m['valid_loss'], 3) for _, m in run.hooks.eval_metrics]}"
    )
    assert out.completed and out.stopped_early and out.step < run.recipe.total_steps
    assert run.hooks.checkpoints[-1][1].step == out.step


def test_from_checkpoint_starts_from_trained_weights(tmp_path: Path, run_recipe: Callable[..., Run]) -> None:
    rows = ds.sentiment_rows(32)
    train = ds.write_jsonl(tmp_path / "train.jsonl", rows)
    valid = ds.write_jsonl(tmp_path / "valid.jsonl", rows[:8])
    cfg = make_cfg("tiny-lm", "classification", "lora", n_epochs=4, learning_rate=2e-2)
    first = run_recipe(cfg, train, valid)
    ckpt = first.hooks.checkpoints[-1][0]
    again = run_recipe(cfg.model_copy(update={"n_epochs": 1}), train, valid, init_dir=ckpt)
    assert again.recipe.progress.step == again.outcome.step == again.recipe.total_steps  # fresh counters
    start = again.hooks.losses[0]
    assert start < first.hooks.losses[0] - 0.1
    merged = run_recipe(
        make_cfg("tiny-lm", "classification", "full", n_epochs=1), train, valid, init_dir=ckpt
    )
    assert merged.hooks.losses[0] < first.hooks.losses[0] - 0.1  # lora merged into a full model
    print(
        f"\nfrom_checkpoint: first run loss {first.hooks.losses[0]:.3f} -> {first.hooks.losses[-1]:.3f}; "
        f"continued lora starts at {start:.3f}, merged full at {merged.hooks.losses[0]:.3f}"
    )


def test_unknown_validation_label_is_a_clear_error(tmp_path: Path, run_recipe: Callable[..., Run]) -> None:
    train = ds.write_jsonl(tmp_path / "train.jsonl", ds.sentiment_rows(16))
    valid = ds.write_jsonl(tmp_path / "valid.jsonl", [{"text": "meh", "label": "neutral"}])
    with pytest.raises(
        ValueError, match=r"validation data has labels that are not in the training data: \['neutral'\]"
    ):
        run_recipe(make_cfg("tiny-lm", "classification", "lora"), train, valid)


@pytest.mark.slow
def test_sentiment_accuracy_beats_baseline(tmp_path: Path, run_recipe: Callable[..., Run]) -> None:
    rows = ds.sentiment_rows(120)
    train = ds.write_jsonl(tmp_path / "train.jsonl", rows[:96])
    held_out = ds.write_jsonl(tmp_path / "held_out.jsonl", rows[96:])
    cfg = make_cfg("minilm-l6", "classification", "lora", n_epochs=3, learning_rate=3e-3, warmup_ratio=0.1)
    from ml.training import build_recipe
    from tests.ml.training.conftest import FakeHooks

    (tmp_path / "s").mkdir()
    hooks = FakeHooks(tmp_path / "s")
    recipe = build_recipe(
        cfg, hooks, workdir=tmp_path, train_path=train, valid_path=held_out, resume_dir=None, init_dir=None,
        base=local_base(cfg.base_model),
    )
    recipe.setup()
    baseline = recipe.evaluate()
    assert baseline is not None
    outcome = recipe.train()
    after = outcome.final_metrics
    print(
        f"\nsentiment minilm-l6 lora: held-out accuracy {baseline['accuracy']:.3f} -> "
        f"{after['accuracy']:.3f}, "
        f"macro-F1 {baseline['macro_f1']:.3f} -> {after['macro_f1']:.3f}, loss "
        f"{hooks.losses[0]:.3f} -> {hooks.losses[-1]:.3f}"
    )
    assert after["accuracy"] >= 0.8 and after["accuracy"] > baseline["accuracy"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path(tmp_path: Path, run_recipe: Callable[..., Run], monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import get_settings
    from ml.modeling import forward_logits
    from tests.ml.served import Served, rows

    monkeypatch.setattr(get_settings(), "device", "cuda")
    examples = ds.sentiment_rows(32)
    train = ds.write_jsonl(tmp_path / "train.jsonl", examples)
    valid = ds.write_jsonl(tmp_path / "valid.jsonl", examples[:8])
    cfg = make_cfg("minilm-l6", "classification", "lora", n_epochs=2, learning_rate=3e-3)
    full = run_recipe(cfg, train, valid)
    assert full.recipe.device.type == "cuda" and full.hooks.losses[-1] < full.hooks.losses[0]
    paused = run_recipe(cfg, train, valid, interrupt=at_step(3, Interrupt.paused))
    resumed = run_recipe(cfg, train, valid, resume_dir=paused.hooks.checkpoints[-1][0])
    for k, v in state_of(full).items():  # bf16 autocast: close, not bit-exact
        torch.testing.assert_close(v, state_of(resumed)[k], atol=1e-3, rtol=1e-3)
    ckpt, trained = full.hooks.checkpoints[-1][0], full.recipe.model.eval()
    with Served(ckpt, "classification", "cuda") as served:  # serving: bf16 weights
        for ids in rows(full.recipe.eval_batches()[0]):
            batch = {"input_ids": ids[None].cuda(), "attention_mask": torch.ones_like(ids)[None].cuda()}
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                want = forward_logits(trained, batch, full.recipe.task)[0].float().cpu()
            torch.testing.assert_close(served.logits(ids.tolist()), want, atol=5e-2, rtol=5e-2)
