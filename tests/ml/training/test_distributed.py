"""Data-parallel training (`ml.training.launch` under torchrun, CPU gloo, 2 processes): the same loss
curve as one process over the same global batches, and checkpoints that resume under another world size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app.models_registry.catalog import local_base
from ml.config import RecipeConfig
from ml.training.launch import LaunchSpec
from tests.ml.training import datasets as ds
from tests.ml.training.conftest import Run, make_cfg

TOL = 1e-4  # relative: the ranks sum their halves of each batch in another order, with other padding
LAUNCH_TIMEOUT_S = 300


def lora_cfg(kind: str = "lora", **overrides: Any) -> RecipeConfig:
    # 25 rows in batches of 8: the last micro-batch of an epoch has one row (rank 1 runs it at weight 0);
    # 2 micro-batches per step exercise DDP's no_sync accumulation.
    values: dict[str, Any] = {"training_type": {"lora_dropout": 0.0}, "batch_size": 8, "n_epochs": 2,
                              "gradient_accumulation_steps": 2, "learning_rate": 2e-2, "checkpoint_every_steps": 2}
    return make_cfg("tiny-lm", "causal_lm", kind, **(values | overrides))


def launch(cfg: RecipeConfig, train: Path, workdir: Path, nproc: int,
           resume_dir: Path | None = None, ok: bool = True, valid: Path | None = None) -> list[dict[str, Any]]:
    """Runs the group to the end; returns rank 0's channel lines."""
    workdir.mkdir(parents=True, exist_ok=True)
    base = local_base(cfg.base_model)
    spec = LaunchSpec(config=cfg, base=base.spec, base_path=str(base.path), workdir=str(workdir),
                      train_path=str(train), valid_path=str(valid) if valid else None,
                      resume_dir=str(resume_dir) if resume_dir else None, device="cpu",
                      events=str(workdir / "events.jsonl"), control=str(workdir / "control"), report=False)
    (workdir / "spec.json").write_text(spec.model_dump_json())
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ml.training.launch", str(workdir / "spec.json")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert (done.returncode == 0) == ok, done.stderr[-4000:]
    return [json.loads(line) for line in (workdir / "events.jsonl").read_text().splitlines()]


def losses(lines: list[dict[str, Any]]) -> dict[int, float]:
    return {m["step"]: m["values"]["train_loss"] for m in lines
            if m["kind"] == "metrics" and "train_loss" in m["values"]}


def close(a: dict[int, float], b: dict[int, float]) -> None:
    assert a.keys() == b.keys(), (a, b)
    for step in a:
        assert abs(a[step] - b[step]) <= TOL * abs(b[step]), (step, a, b)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_two_processes_follow_the_single_process_curve(
    tmp_path: Path, run_recipe: Callable[..., Run], kind: str
) -> None:
    train = ds.write_jsonl(tmp_path / "train.jsonl", ds.chat_rows(25))
    cfg = lora_cfg(kind, learning_rate=2e-2 if kind == "lora" else 1e-2)
    single = run_recipe(cfg, train)
    lines = launch(cfg, train, tmp_path / "group", nproc=2)

    expected = {step: m["train_loss"] for step, m in single.hooks.train_metrics}
    assert len(expected) == 4
    close(losses(lines), expected)
    outcome = next(m for m in lines if m["kind"] == "outcome")["outcome"]
    assert outcome["completed"] and outcome["step"] == 4
    assert outcome["trained_tokens"] == single.outcome.trained_tokens  # every row counted once
    first = next(m for m in lines if m["kind"] == "message" and "data parallel" in m["text"])
    assert first["data"]["world_size"] == 2 and first["data"]["backend"] == "gloo"
    logged = next(m["values"] for m in lines if m["kind"] == "metrics" and "train_loss" in m["values"])
    assert logged["rank0_tokens_per_second"] > 0 and logged["rank1_tokens_per_second"] > 0  # per-rank throughput
    weights = "adapter_model.safetensors" if kind == "lora" else "model.safetensors"
    assert (tmp_path / "group" / "final" / weights).exists()  # one consolidated copy


def test_a_two_process_checkpoint_resumes_in_one_process(
    tmp_path: Path, run_recipe: Callable[..., Run]
) -> None:
    train = ds.write_jsonl(tmp_path / "train.jsonl", ds.chat_rows(25))
    cfg = lora_cfg()
    lines = launch(cfg, train, tmp_path / "group", nproc=2)
    at_two = next(Path(m["dir"]) for m in lines if m["kind"] == "checkpoint" and m["step"] == 2)

    resumed = run_recipe(cfg, train, resume_dir=at_two)

    group = losses(lines)
    close({s: m["train_loss"] for s, m in resumed.hooks.train_metrics}, {s: v for s, v in group.items() if s > 2})
    assert resumed.outcome.step == 4


def _pause_at(workdir: Path, step: int) -> None:
    """The runner's side of a pause: `paused` in the control file once rank 0 reports `step`."""
    events, deadline = workdir / "events.jsonl", time.monotonic() + LAUNCH_TIMEOUT_S
    while time.monotonic() < deadline:
        lines = events.read_text().splitlines() if events.exists() else []
        if any(json.loads(x).get("kind") == "progress" and json.loads(x)["step"] >= step for x in lines):
            (workdir / "control").write_text("paused")
            return
        time.sleep(0.05)


def test_a_pause_stops_every_rank_at_a_checkpoint(tmp_path: Path, run_recipe: Callable[..., Run]) -> None:
    train = ds.write_jsonl(tmp_path / "train.jsonl", ds.chat_rows(25))
    cfg = lora_cfg(checkpoint_every_steps=100, n_epochs=3)
    workdir = tmp_path / "group"
    workdir.mkdir()
    pauser = threading.Thread(target=_pause_at, args=(workdir, 1))
    pauser.start()
    lines = launch(cfg, train, workdir, nproc=2)  # returns: no rank is left waiting on another
    pauser.join()
    outcome = next(m for m in lines if m["kind"] == "outcome")["outcome"]
    assert not outcome["completed"] and outcome["interrupt"] == "paused"
    (saved,) = [m for m in lines if m["kind"] == "checkpoint"]
    assert saved["step"] == outcome["step"] < 6

    resumed = run_recipe(cfg, train, resume_dir=Path(saved["dir"]))
    assert resumed.outcome.completed and resumed.outcome.step == 6


def test_a_users_error_comes_back_as_one_error_line(tmp_path: Path) -> None:
    rows = [r | {"label": "positive"} for r in ds.sentiment_rows(8)]  # one label: nothing to classify
    train = ds.write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = make_cfg("tiny-lm", "classification", "lora")
    lines = launch(cfg, train, tmp_path / "group", nproc=2, ok=False)
    (err,) = [m for m in lines if m["kind"] in ("error", "outcome")]
    assert err["kind"] == "error" and err["code"] == "invalid_training_data" and not err.get("internal")

    broken = ds.write_jsonl(tmp_path / "broken.jsonl", [{"messages": []}] * 4)  # not the library's InputError
    lines = launch(lora_cfg(), broken, tmp_path / "group2", nproc=2, ok=False)
    (err,) = [m for m in lines if m["kind"] in ("error", "outcome")]
    assert err["internal"] and err["message"].startswith("RecordError")


def test_ddp_ranks_split_the_evaluation_and_report_the_single_process_metrics(
    tmp_path: Path, run_recipe: Callable[..., Run]
) -> None:
    """Each rank scores every other validation batch (11 rows in batches of 4: 3 batches, so rank 1
    scores one); the merged sums and predictions give one process's metrics, per-class recall included."""
    rows = ds.sentiment_rows(36)
    train = ds.write_jsonl(tmp_path / "train.jsonl", rows[:25])
    valid = ds.write_jsonl(tmp_path / "valid.jsonl", rows[25:])
    cfg = make_cfg("tiny-lm", "classification", "lora", batch_size=4, n_epochs=1, eval_every_steps=3,
                   learning_rate=2e-2, checkpoint_every_steps=0, training_type={"lora_dropout": 0.0})
    single = run_recipe(cfg, train, valid)
    lines = launch(cfg, train, tmp_path / "group", nproc=2, valid=valid)

    expected = {step: m for step, m in single.hooks.eval_metrics}
    got = {m["step"]: m["values"] for m in lines if m["kind"] == "metrics" and "valid_loss" in m["values"]}
    assert got.keys() == expected.keys() and len(got) >= 2
    for step, metrics in got.items():
        assert metrics.keys() == expected[step].keys()
        assert any(k.startswith("recall_") for k in metrics)
        for key, value in metrics.items():
            assert abs(value - expected[step][key]) <= TOL * max(1.0, abs(expected[step][key])), (step, key)


@pytest.mark.parametrize("variant", ["dpo", "packing"])
def test_dpo_and_packing_follow_the_single_process_curve(
    tmp_path: Path, run_recipe: Callable[..., Run], variant: str
) -> None:
    """DPO: each rank takes whole pairs of every micro-batch (7 pairs in batches of 4: rank 1 gets one
    pair of the last), the pair stats are summed over ranks. Packing: each rank takes packed rows."""
    if variant == "dpo":
        train = ds.write_jsonl(tmp_path / "train.jsonl", ds.preference_rows(15))
        cfg = lora_cfg(method="dpo", beta=0.1, batch_size=4, learning_rate=1e-2)
        keys = ("train_loss", "reward_margin", "chosen_reward")  # accuracy thresholds ~0 margins: noise
    else:
        train = ds.write_jsonl(tmp_path / "train.jsonl", ds.chat_rows(40))
        cfg = lora_cfg(packing=True, max_seq_length=96)
        keys = ("train_loss",)
    single = run_recipe(cfg, train)
    lines = launch(cfg, train, tmp_path / "group", nproc=2)

    expected = dict(single.hooks.train_metrics)
    got = {m["step"]: m["values"] for m in lines if m["kind"] == "metrics" and "train_loss" in m["values"]}
    assert got.keys() == expected.keys() and len(got) >= 2
    for step, values in got.items():
        for key in keys:
            assert abs(values[key] - expected[step][key]) <= TOL * max(1.0, abs(expected[step][key])), (step, key)
    outcome = next(m for m in lines if m["kind"] == "outcome")["outcome"]
    assert outcome["trained_tokens"] == single.outcome.trained_tokens
