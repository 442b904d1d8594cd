"""Recipe test plumbing: fake hooks that record every call, config and run helpers."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from app.models_registry.catalog import local_base
from app.settings import get_settings
from ml.checkpoint import CheckpointInfo
from ml.config import Interrupt, RecipeConfig, TrainOutcome
from ml.training import build_recipe

torch.set_num_threads(1)  # the CI box is small and shared


@dataclass
class FakeHooks:
    """Collects calls. `interrupt(hooks)` decides what `interrupted()` answers (None: never)."""

    store: Path
    interrupt: Callable[[FakeHooks], Interrupt | None] | None = None
    messages: list[tuple[str, str]] = field(default_factory=list)
    train_metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    eval_metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    progress_calls: list[tuple[int, int, float, int]] = field(default_factory=list)
    checkpoints: list[tuple[Path, CheckpointInfo]] = field(default_factory=list)
    interrupted_calls: int = 0

    def message(self, text: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.messages.append((level, text))

    def metrics(self, step: int, values: dict[str, float]) -> None:
        target = self.eval_metrics if "valid_loss" in values else self.train_metrics
        target.append((step, dict(values)))

    def progress(self, step: int, total_steps: int, epoch: float, trained_tokens: int) -> None:
        self.progress_calls.append((step, total_steps, epoch, trained_tokens))

    def interrupted(self) -> Interrupt | None:
        self.interrupted_calls += 1
        return self.interrupt(self) if self.interrupt is not None else None

    @property
    def step(self) -> int:
        return self.progress_calls[-1][0] if self.progress_calls else 0

    def checkpoint(self, local_dir: Path, info: CheckpointInfo) -> None:
        dst = self.store / f"step-{info.step:08d}"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.move(str(local_dir), dst)  # takes ownership, like the runner
        self.checkpoints.append((dst, info))

    @property
    def losses(self) -> list[float]:
        return [m["train_loss"] for _, m in self.train_metrics]


@dataclass
class Run:
    outcome: TrainOutcome
    hooks: FakeHooks
    recipe: Any
    seconds: float


def make_cfg(base_model: str, task: str, kind: str, **overrides: Any) -> RecipeConfig:
    values: dict[str, Any] = {
        "base_model": base_model,
        "task": task,
        "training_type": {"type": kind, "lora_r": 8, "lora_alpha": 16, "num_virtual_tokens": 4},
        "seed": 11,
        "n_epochs": 3,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "max_seq_length": 64,
        "training_file_key": "train.jsonl",
    }
    if isinstance(overrides.get("training_type"), dict):
        values["training_type"] |= overrides.pop("training_type")
    return RecipeConfig.model_validate(values | overrides)


@pytest.fixture(autouse=True)
def _training_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bit-exactness checks assume CPU; `test_cuda_path` covers the GPU (bf16 autocast) path."""
    monkeypatch.setattr(get_settings(), "device", "cpu")


@pytest.fixture
def run_recipe(tmp_path: Path) -> Callable[..., Run]:
    counter = iter(range(1000))

    def run(
        cfg: RecipeConfig,
        train: Path,
        valid: Path | None = None,
        *,
        resume_dir: Path | None = None,
        init_dir: Path | None = None,
        interrupt: Callable[[FakeHooks], Interrupt | None] | None = None,
    ) -> Run:
        n = next(counter)
        store, workdir = tmp_path / f"store{n}", tmp_path / f"work{n}"
        store.mkdir()
        workdir.mkdir()
        hooks = FakeHooks(store, interrupt)
        t0 = time.perf_counter()
        recipe = build_recipe(
            cfg,
            hooks,
            workdir=workdir,
            train_path=train,
            valid_path=valid,
            resume_dir=resume_dir,
            init_dir=init_dir,
            base=local_base(cfg.base_model),
        )
        recipe.setup()
        outcome = recipe.train()
        return Run(outcome, hooks, recipe, time.perf_counter() - t0)

    return run


def at_step(step: int, kind: Interrupt) -> Callable[[FakeHooks], Interrupt | None]:
    """Interrupt before the first micro-batch after optimizer step `step`."""
    return lambda h: kind if h.step >= step else None


def at_call(n: int, kind: Interrupt) -> Callable[[FakeHooks], Interrupt | None]:
    """Interrupt from the n-th `interrupted()` call on (one call per micro-batch / eval batch)."""
    return lambda h: kind if h.interrupted_calls >= n else None


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def loss_drop(losses: list[float], k: int = 3) -> tuple[float, float]:
    """(mean of the first k logged losses, mean of the last k)."""
    k = max(1, min(k, len(losses) // 2))
    return mean(losses[:k]), mean(losses[-k:])
