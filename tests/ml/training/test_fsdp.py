"""Sharded full fine-tunes (`resources.strategy: fsdp`, FSDP2 `fully_shard` under torchrun, CPU gloo, 2
processes): the same loss curve and final metrics as one process over the same global batches, and
checkpoints in the one consolidated format, which resume under another world size and strategy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from app.models_registry.catalog import local_base
from ml.config import RecipeConfig
from ml.errors import InputError
from ml.training import build_recipe
from ml.training.distributed import World
from tests.ml.training import datasets as ds
from tests.ml.training.conftest import FakeHooks, Run, make_cfg
from tests.ml.training.test_distributed import close, launch, losses

METRIC_TOL = 1e-4  # relative, like the loss curve: the ranks sum their shards in another order
WEIGHT_TOL = 1e-4  # relative distance between the exported weights of the two runs


def fsdp_cfg(**overrides: Any) -> RecipeConfig:
    # 25 rows in batches of 8, 2 micro-batches per step: 4 steps over 2 epochs, the last micro-batch of
    # an epoch one row (rank 1 runs it at weight 0); gradient clipping on (a norm over sharded grads).
    values: dict[str, Any] = {"batch_size": 8, "n_epochs": 2, "gradient_accumulation_steps": 2,
                              "learning_rate": 1e-2, "checkpoint_every_steps": 2, "eval_every_steps": 2,
                              "max_grad_norm": 1.0, "resources": {"devices": 2, "strategy": "fsdp"}}
    return make_cfg("tiny-lm", "causal_lm", "full", **(values | overrides))


def same_metrics(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys(), (a, b)
    for key in a:
        assert abs(a[key] - b[key]) <= METRIC_TOL * max(1.0, abs(b[key])), (key, a, b)


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path]:
    rows = ds.chat_rows(31)
    return ds.write_jsonl(tmp_path / "train.jsonl", rows[:25]), ds.write_jsonl(tmp_path / "valid.jsonl", rows[25:])


def test_fsdp_follows_one_process_and_its_checkpoint_resumes_in_one(
    tmp_path: Path, run_recipe: Callable[..., Run], data: tuple[Path, Path]
) -> None:
    train, valid = data
    cfg = fsdp_cfg()
    single = run_recipe(cfg, train, valid)
    lines = launch(cfg, train, tmp_path / "group", nproc=2, valid=valid)

    expected = {step: m["train_loss"] for step, m in single.hooks.train_metrics}
    assert len(expected) == 4
    close(losses(lines), expected)
    first = next(m for m in lines if m["kind"] == "message" and "FSDP" in m["text"])
    assert first["data"]["strategy"] == "fsdp" and first["data"]["world_size"] == 2
    whole = sum(p.numel() for p in single.recipe.model.parameters())
    assert first["data"]["parameters_on_rank"] < 0.6 * whole  # rank 0 holds about half (norms are tiny)
    evals = {m["step"]: m["values"] for m in lines if m["kind"] == "metrics" and "valid_loss" in m["values"]}
    assert evals.keys() == {2, 4}  # every rank evaluated (each forward all-gathers), rank 0 reported
    outcome = next(m for m in lines if m["kind"] == "outcome")["outcome"]
    assert outcome["completed"] and outcome["step"] == 4
    assert outcome["trained_tokens"] == single.outcome.trained_tokens
    same_metrics(outcome["final_metrics"], single.outcome.final_metrics)
    # the export is the plain format, whole tensors by their usual names, about the single run's weights
    # (Adam moves a weight whose gradient is ~0 by ~lr either way: compare whole tensors, not elements)
    exported = load_file(tmp_path / "group" / "final" / "model.safetensors")
    plain = load_file(single.hooks.checkpoints[-1][0] / "model.safetensors")
    assert exported.keys() == plain.keys()
    drift = {name: float((exported[name] - t).norm() / t.norm()) for name, t in plain.items()}
    assert max(drift.values()) < WEIGHT_TOL, drift

    at_two = next(Path(m["dir"]) for m in lines if m["kind"] == "checkpoint" and m["step"] == 2)
    resumed = run_recipe(cfg, train, valid, resume_dir=at_two)  # one plain process
    close({s: m["train_loss"] for s, m in resumed.hooks.train_metrics}, {s: v for s, v in expected.items() if s > 2})
    assert resumed.outcome.step == 4
    same_metrics(resumed.outcome.final_metrics, single.outcome.final_metrics)


def test_a_one_process_checkpoint_resumes_sharded(
    tmp_path: Path, run_recipe: Callable[..., Run], data: tuple[Path, Path]
) -> None:
    train, valid = data
    cfg = fsdp_cfg()
    single = run_recipe(cfg, train, valid)
    at_two = next(path for path, info in single.hooks.checkpoints if info.step == 2)

    lines = launch(cfg, train, tmp_path / "group", nproc=2, valid=valid, resume_dir=at_two)

    expected = {step: m["train_loss"] for step, m in single.hooks.train_metrics if step > 2}
    close(losses(lines), expected)
    outcome = next(m for m in lines if m["kind"] == "outcome")["outcome"]
    assert outcome["completed"] and outcome["step"] == 4
    same_metrics(outcome["final_metrics"], single.outcome.final_metrics)


@pytest.mark.parametrize("kind", ["lora", "prompt_tuning"])
def test_fsdp_refuses_adapters_before_loading_anything(tmp_path: Path, data: tuple[Path, Path], kind: str) -> None:
    cfg = make_cfg("tiny-lm", "causal_lm", kind, resources={"devices": 2, "strategy": "fsdp"})
    base = local_base(cfg.base_model)
    recipe = build_recipe(cfg, FakeHooks(tmp_path), workdir=tmp_path, train_path=data[0], valid_path=None,
                          resume_dir=None, init_dir=None, base=base, device="cpu")
    recipe.world = World(rank=0, size=2, backend="gloo", strategy="fsdp")  # as in a group, without one
    with pytest.raises(InputError) as err:
        recipe.setup()
    assert err.value.param == "resources.strategy" and err.value.code == "unsupported_resources"
