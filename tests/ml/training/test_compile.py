"""`compile` (torch.compile of the training forward) and the fused AdamW: a compiled run trains like an
eager one, resumes exactly, and `compile: true` where it cannot apply is a clear error."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ml.config import Interrupt
from ml.errors import InputError
from ml.training import compiled
from tests.ml.training import datasets as ds
from tests.ml.training.conftest import Run, at_step, make_cfg
from tests.ml.training.test_control import assert_same_weights, state_of

RunRecipe = Callable[..., Run]
# Inductor builds C++ kernels: minutes per model on the small CI box, so the default runs capture the
# graphs (dynamo + AOT autograd, what `compile` changes in the loop) without code generation.
INDUCTOR = pytest.mark.skipif(os.environ.get("TUNEHOUSE_TEST_INDUCTOR") != "1",
                              reason="set TUNEHOUSE_TEST_INDUCTOR=1 to build inductor kernels (minutes)")
BACKENDS = ["aot_eager", pytest.param("inductor", marks=[pytest.mark.slow, INDUCTOR])]


def _chat(tmp_path: Path, n: int = 12) -> Path:
    return ds.write_jsonl(tmp_path / "train.jsonl", ds.chat_rows(n))


def _is_compiled(run: Run) -> bool:
    return isinstance(run.recipe.net, torch._dynamo.eval_frame.OptimizedModule)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_training_matches_eager(
    backend: str, tmp_path: Path, run_recipe: RunRecipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compiled, "BACKEND", backend)
    # no dropout: inductor draws its masks differently from eager kernels
    cfg = make_cfg("tiny-lm", "causal_lm", "lora", n_epochs=1, batch_size=4, learning_rate=1e-2,
                   training_type={"lora_dropout": 0.0})
    eager = run_recipe(cfg, _chat(tmp_path))
    fast = run_recipe(cfg.model_copy(update={"compile": True}), _chat(tmp_path))
    assert not _is_compiled(eager) and _is_compiled(fast)
    assert len(fast.hooks.losses) == 3
    assert fast.hooks.losses == pytest.approx(eager.hooks.losses, abs=1e-4)
    assert any("torch.compile (requested)" in text for _, text in fast.hooks.messages)
    assert fast.recipe.optimizer.defaults["fused"]  # CPU has the fused AdamW kernel


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_run_resumes_exactly(
    backend: str, tmp_path: Path, run_recipe: RunRecipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compiled, "BACKEND", backend)
    cfg = make_cfg("tiny-lm", "causal_lm", "lora", n_epochs=2, batch_size=4, learning_rate=1e-2,
                   gradient_accumulation_steps=2, compile=True, training_type={"lora_dropout": 0.2})
    train = _chat(tmp_path)
    full = run_recipe(cfg, train)
    paused = run_recipe(cfg, train, interrupt=at_step(1, Interrupt.paused))
    assert paused.outcome.interrupt is Interrupt.paused and _is_compiled(paused)
    resumed = run_recipe(cfg, train, resume_dir=paused.hooks.checkpoints[-1][0])
    assert resumed.outcome.completed and resumed.outcome.step == full.outcome.step
    assert_same_weights(state_of(full), state_of(resumed))
    tail = [m["train_loss"] for s, m in full.hooks.train_metrics if s > paused.outcome.step]
    assert resumed.hooks.losses == pytest.approx(tail, abs=1e-6)


def test_compile_true_where_it_cannot_apply_fails_setup(tmp_path: Path, run_recipe: RunRecipe) -> None:
    cfg = make_cfg("tiny-lm", "causal_lm", "lora", n_epochs=1, batch_size=4, packing=True, compile=True)
    with pytest.raises(InputError, match="compile: not supported with packing") as err:
        run_recipe(cfg, _chat(tmp_path))
    assert err.value.param == "compile"
    auto = run_recipe(cfg.model_copy(update={"compile": "auto"}), _chat(tmp_path))  # auto: eager
    assert auto.outcome.completed and not _is_compiled(auto)


def test_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not compiled.plan("auto", cpu, 10_000, None).on  # measured: eager wins on CPU
    monkeypatch.setattr(compiled, "AUTO_MIN_STEPS", {"cuda": 200})
    assert not compiled.plan(False, cuda, 10_000, None).on
    assert compiled.plan("auto", cuda, 10_000, None).on
    assert not compiled.plan("auto", cuda, 10, None).on  # too short to repay compiling
    assert not compiled.plan("auto", cuda, 10_000, "not supported with DPO").on
    assert compiled.plan(True, cpu, 1, None).on
    assert not compiled.plan("auto", torch.device("mps"), 10_000, None).on
    monkeypatch.setattr(compiled, "_cxx", lambda: None)
    with pytest.raises(InputError, match="needs a C\\+\\+ compiler"):
        compiled.plan(True, cpu, 100, None)
    assert "C++ compiler" in compiled.plan("auto", cpu, 100, None).why
