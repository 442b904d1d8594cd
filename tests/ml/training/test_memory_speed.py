"""Memory and speed options through the recipe: gradient checkpointing, precision and the loss scaler's
state, QLoRA's refusal on a CPU worker, padding-free packing (loss equality, row plans), the memory
model against measured peaks and the worker's fail-fast check. GPU-only paths are at the end (skipped
without CUDA / bitsandbytes)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from app.models_registry.catalog import local_base
from ml import memory
from ml.config import RecipeConfig, Task, TrainingKind
from ml.data.packing import pack_rows, row_lengths
from ml.errors import InputError
from ml.modeling import load_task_model, load_tokenizer, qlora_unavailable
from ml.training import build_recipe
from ml.training import data as D
from ml.training import packing as P
from ml.training.losses import loss_sum
from ml.training.precision import choose
from ml.training.state import capture_rng, load_state, save_state
from tests.ml.training import datasets as ds
from tests.ml.training.conftest import FakeHooks, Run, make_cfg

ROOT = Path(__file__).resolve().parents[3]
HAS_CUDA = torch.cuda.is_available()
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def weights(run: Run) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.recipe.model.state_dict().items()}


def setup_only(cfg: RecipeConfig, train: Path, tmp_path: Path) -> Any:
    hooks = FakeHooks(tmp_path)
    recipe = build_recipe(cfg, hooks, workdir=tmp_path, train_path=train, valid_path=None, resume_dir=None,
                          init_dir=None, base=local_base(cfg.base_model))
    recipe.setup()
    return recipe


def checkpointing_on(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return any(getattr(m, "gradient_checkpointing", False) for m in base.modules())


# --- gradient checkpointing -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_gradient_checkpointing_trains_the_same(kind: str, tmp_path: Path, run_recipe: Callable[..., Run]) -> None:
    train = ds.write_jsonl(tmp_path / "train.jsonl", ds.chat_rows(16))
    cfg = make_cfg("tiny-lm", "causal_lm", kind, n_epochs=2, batch_size=4, learning_rate=1e-2,
                   training_type={"lora_dropout": 0.2})  # dropout: recomputation must replay the same masks
    plain = run_recipe(cfg, train)
    checkpointed = run_recipe(cfg.model_copy(update={"gradient_checkpointing": True}), train)
    assert not checkpointing_on(plain.recipe.model) and checkpointing_on(checkpointed.recipe.model)
    assert checkpointed.hooks.losses == pytest.approx(plain.hooks.losses, abs=1e-5)
    for name, value in weights(plain).items():
        torch.testing.assert_close(weights(checkpointed)[name], value, atol=1e-5, rtol=0, msg=name)
    assert any("gradient checkpointing on" in text for _, text in checkpointed.hooks.messages)


# --- precision --------------------------------------------------------------------------------


def test_precision_choices() -> None:
    assert choose("auto", "cpu", False) == "fp32"
    assert choose("auto", "cuda", True) == "bf16"
    assert choose("auto", "cuda", False) == "fp16"  # pre-Ampere GPUs: fp16 with loss scaling
    assert choose("bf16", "cpu", False) == "bf16"  # CPU autocast: allowed when asked
    assert choose("fp16", "cuda", True) == "fp16" and choose("fp32", "cuda", True) == "fp32"
    with pytest.raises(InputError, match="precision 'fp16' needs a CUDA worker; this worker trains on cpu"):
        choose("fp16", "cpu", False)
    with pytest.raises(InputError, match="this GPU has no native bf16"):
        choose("bf16", "cuda", False)


def test_fp16_on_a_cpu_worker_fails_in_setup(tmp_path: Path) -> None:
    train = ds.write_jsonl(tmp_path / "train.jsonl", ds.chat_rows(8))
    with pytest.raises(InputError, match="needs a CUDA worker") as err:
        setup_only(make_cfg("tiny-lm", "causal_lm", "lora", precision="fp16"), train, tmp_path)
    assert err.value.param == "precision" and err.value.code == "invalid_request"


def test_bf16_autocast_on_cpu_keeps_fp32_master_weights(tmp_path: Path, run_recipe: Callable[..., Run]) -> None:
    train = ds.write_jsonl(tmp_path / "train.jsonl", ds.chat_rows(16))
    run = run_recipe(make_cfg("tiny-lm", "causal_lm", "lora", precision="bf16", learning_rate=1e-2), train)
    assert run.recipe.precision.name == "bf16" and run.recipe.scaler is None
    assert all(p.dtype == torch.float32 for p in run.recipe.model.parameters() if p.requires_grad)
    assert all(math.isfinite(x) for x in run.hooks.losses) and run.hooks.losses[-1] < run.hooks.losses[0]


def test_loss_scaler_state_round_trips_as_json(tmp_path: Path) -> None:
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    for _ in range(3):  # grows the scale and moves the growth tracker
        scaler.scale((param * 2).sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    save_state(tmp_path, opt, sched, capture_rng(), {"step": 3}, scaler)
    saved = json.loads((tmp_path / "scaler.json").read_text())
    assert saved["scale"] == scaler.get_scale() > 1024.0
    again = torch.amp.GradScaler("cpu")
    load_state(tmp_path, opt, sched, again)
    assert again.state_dict() == scaler.state_dict()


# --- QLoRA ------------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_CUDA and HAS_BNB, reason="this worker can train QLoRA")
def test_qlora_is_refused_by_a_worker_without_cuda_and_bitsandbytes(tmp_path: Path) -> None:
    train = ds.write_jsonl(tmp_path / "train.jsonl", ds.chat_rows(8))
    with pytest.raises(InputError, match=r"^QLoRA needs a CUDA worker with bitsandbytes; this worker has none") as err:
        setup_only(make_cfg("tiny-lm", "causal_lm", "qlora"), train, tmp_path)
    assert err.value.code == "invalid_request" and "it trains on cpu" in err.value.message
    if not HAS_BNB:
        assert "bitsandbytes is not installed" in str(qlora_unavailable(torch.device("cuda")))


# --- packing ----------------------------------------------------------------------------------


def test_pack_rows_is_a_deterministic_full_plan() -> None:
    lengths = [5, 64, 30, 31, 2, 17, 64, 40, 24, 9, 33, 1]
    rows = pack_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # every example once
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) == math.ceil(sum(lengths) / 64)  # this mix packs perfectly
    assert rows == pack_rows(list(lengths), 64)  # a pure function of the lengths
    assert row_lengths(rows, lengths)[:2] == [64, 64]


@pytest.fixture
def tiny_examples() -> tuple[Any, list[D.Example]]:
    path = local_base("tiny-lm").path
    tok = load_tokenizer(path)
    model = load_task_model(Task.causal_lm, path, tok, None).train()
    return model, D.encode(ds.chat_rows(12), Task.causal_lm, tok, 64, None, True).examples


@pytest.mark.parametrize("per_example_attention", [False, True])
def test_packed_loss_and_gradients_equal_the_unpacked_examples(
    tiny_examples: tuple[Any, list[D.Example]], per_example_attention: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, examples = tiny_examples
    weight = model.get_input_embeddings().weight

    def grads_of(loss: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        loss.backward()
        assert weight.grad is not None
        return weight.grad.clone()

    singles = sum(loss_sum(Task.causal_lm, model(input_ids=torch.tensor([e.input_ids])).logits,
                           {"labels": torch.tensor([e.labels])}) for e in examples)
    assert isinstance(singles, torch.Tensor)
    want = grads_of(singles)
    used: list[int] = []
    if per_example_attention:
        assert P.use_packed_attention(model)
        spans = P.example_spans
        monkeypatch.setattr(P, "example_spans", lambda pos: used.append(1) or spans(pos))
    rows = pack_rows([len(e.input_ids) for e in examples], 160)
    batch = P.PackedCollator(0)([[examples[i] for i in row] for row in rows])
    assert len(rows) < len(examples) and int(batch["n_targets"]) == sum(
        sum(x != D.IGNORE for x in (e.labels or [])[1:]) for e in examples)
    from ml.modeling import forward_packed

    packed = loss_sum(Task.causal_lm, forward_packed(model, batch), batch)
    print(f"\npacked loss {packed.item():.6f} vs unpacked {singles.item():.6f} ({len(examples)} examples, "
          f"{len(rows)} rows, per-example attention {per_example_attention})")
    assert packed.item() == pytest.approx(singles.item(), rel=1e-5)
    torch.testing.assert_close(grads_of(packed), want, atol=1e-5, rtol=1e-4)
    assert bool(used) == per_example_attention  # the per-example path ran (once per layer)


def test_packed_job_counts_rows_and_trains_the_same_tokens(tmp_path: Path, run_recipe: Callable[..., Run]) -> None:
    train = ds.write_jsonl(tmp_path / "train.jsonl", ds.chat_rows(24))
    cfg = make_cfg("tiny-lm", "causal_lm", "lora", n_epochs=2, batch_size=2, learning_rate=1e-2, max_seq_length=128)
    padded = run_recipe(cfg, train)
    packed = run_recipe(cfg.model_copy(update={"packing": True}), train)
    rows = packed.recipe.packed_rows
    assert rows is not None and len(rows) < len(packed.recipe.train_set)
    assert packed.recipe.total_steps == 2 * math.ceil(len(rows) / 2) < padded.recipe.total_steps
    assert packed.outcome.trained_tokens == padded.outcome.trained_tokens  # the same real tokens, no padding
    assert packed.hooks.losses[-1] < packed.hooks.losses[0]
    assert any("packing 24 examples into" in text for _, text in packed.hooks.messages)


def test_packing_refuses_other_tasks(tmp_path: Path) -> None:
    train = ds.write_jsonl(tmp_path / "train.jsonl", ds.sentiment_rows(8))
    with pytest.raises(InputError, match="packing applies to causal_lm"):
        setup_only(make_cfg("tiny-lm", "classification", "lora", packing=True), train, tmp_path)


# --- the memory model -------------------------------------------------------------------------


def test_model_shape_from_config_and_safetensors_headers() -> None:
    path = local_base("tiny-lm").path
    shape = memory.shape_from_dir(path)
    assert shape is not None
    stored = sum(t.numel() for t in load_file(str(path / "model.safetensors")).values())
    assert shape.params == stored and (shape.hidden, shape.layers, shape.vocab) == (64, 2, 1336)
    assert shape.gated_mlp and shape.tied_embeddings and not shape.attention_dropout
    from_config = memory.shape_from_config(json.loads((path / "config.json").read_text()))
    assert from_config is not None and from_config.params == pytest.approx(stored, rel=0.01)  # no headers needed
    assert memory.shape_from_dir(path.parent / "nope") is None


def test_plan_turns_checkpointing_on_only_when_needed() -> None:
    shape = memory.shape_from_dir(local_base("tiny-lm").path)
    assert shape is not None
    work = memory.Workload(Task.causal_lm, TrainingKind.lora, rows=64, seq_len=256)
    plain, ckpt = memory.estimate(shape, work), memory.plan(shape, work, True, None)
    assert ckpt.checkpointing and ckpt.activations_bytes < plain.activations_bytes
    assert (ckpt.weights_bytes, ckpt.optimizer_bytes) == (plain.weights_bytes, plain.optimizer_bytes)
    between = int((plain.peak_bytes + ckpt.peak_bytes) / 2 / memory.HEADROOM)
    assert not memory.plan(shape, work, "auto", None).checkpointing  # device unknown: as configured (off)
    assert memory.plan(shape, work, "auto", between).checkpointing
    assert not memory.plan(shape, work, "auto", 10 * plain.peak_bytes).checkpointing
    freeze = memory.Workload(Task.causal_lm, TrainingKind.freeze, rows=64, seq_len=256)
    assert not memory.plan(shape, freeze, True, None).checkpointing  # no backward through the layers
    qlora = memory.estimate(shape, memory.Workload(Task.causal_lm, TrainingKind.qlora, rows=1, seq_len=8))
    assert qlora.weights_bytes < memory.estimate(shape, memory.Workload(
        Task.causal_lm, TrainingKind.lora, rows=1, seq_len=8)).weights_bytes



def test_per_device_memory_splits_rows_and_fsdp_shards() -> None:
    shape = memory.shape_from_dir(local_base("tiny-lm").path)
    assert shape is not None
    one = memory.estimate(shape, memory.Workload(Task.causal_lm, TrainingKind.full, rows=8, seq_len=64))
    ddp = memory.estimate(shape, memory.Workload(Task.causal_lm, TrainingKind.full, rows=8, seq_len=64, world=4))
    fsdp = memory.estimate(shape, memory.Workload(Task.causal_lm, TrainingKind.full, rows=8, seq_len=64, world=4,
                                                  sharded=True))
    assert ddp.activations_bytes * 4 == one.activations_bytes  # 2 of the micro-batch's 8 rows per device
    assert (ddp.weights_bytes, ddp.optimizer_bytes) == (one.weights_bytes, one.optimizer_bytes)  # replicas
    assert fsdp.optimizer_bytes * 4 == one.optimizer_bytes and fsdp.gradients_bytes * 4 == one.gradients_bytes
    assert one.weights_bytes / 4 < fsdp.weights_bytes < one.weights_bytes  # a quarter + two gathered blocks


MEASURE = """
import json, sys, torch
from pathlib import Path
torch.set_num_threads(1)
from ml.config import Task, TrainingTypeConfig
from ml.modeling import apply_training_type, load_task_model, load_tokenizer
from ml.training.losses import loss_sum
def rss(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
path, task, kind, targets = sys.argv[1], Task(sys.argv[2]), sys.argv[3], sys.argv[6].split(",")
rows, seq = int(sys.argv[4]), int(sys.argv[5])
tok = load_tokenizer(Path(path))
start = rss("VmRSS")
model = load_task_model(task, Path(path), tok, ["a", "b"] if task is Task.classification else None)
model = apply_training_type(model, task, TrainingTypeConfig(type=kind), targets).train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
ids = torch.randint(5, 1000, (rows, seq))
batch = {"labels": ids, "targets": torch.zeros(rows, dtype=torch.long)}
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM)
for _ in range(2):
    loss_sum(task, model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, batch).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
print(json.dumps({"peak": rss("VmHWM") - start}))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
@pytest.mark.parametrize(("model_id", "task", "kind", "rows", "seq", "targets"), [
    ("tiny-lm", "causal_lm", "full", 16, 256, "q_proj,v_proj"),
    ("minilm-l6", "classification", "lora", 16, 128, "query,value"),
])
def test_memory_model_against_a_measured_peak(model_id: str, task: str, kind: str, rows: int, seq: int,
                                              targets: str) -> None:
    """Peak resident memory of real training steps (in a fresh process, from before the model loads)."""
    path = local_base(model_id).path
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(path), task, kind, str(rows), str(seq), targets],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
    shape = memory.shape_from_dir(path)
    assert shape is not None
    work = memory.Workload(Task(task), TrainingKind(kind), rows=rows, seq_len=seq,
                           lora_targets=tuple(targets.split(",")))
    predicted = memory.estimate(shape, work).peak_bytes
    print(f"\n{model_id} {task} {kind} {rows}x{seq}: predicted {predicted / 2**20:.0f} MiB, measured "
          f"{measured / 2**20:.0f} MiB ({predicted / measured:.2f}x)")
    assert 0.4 < predicted / measured < 2.5  # roughly right: the same order of magnitude, within 2.5x


def test_worker_fails_fast_when_the_job_cannot_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = ds.write_jsonl(tmp_path / "train.jsonl", ds.chat_rows(16))
    cfg = make_cfg("tiny-lm", "causal_lm", "lora", batch_size=16, gradient_checkpointing="auto")
    probe = setup_only(cfg, train, tmp_path / "probe")
    shape = memory.shape_from_dir(probe.sources.weights)
    assert shape is not None and not checkpointing_on(probe.model)  # plenty of RAM: auto stays off
    plain = memory.estimate(shape, probe._workload())
    ckpt = memory.plan(shape, probe._workload(), True, None)
    # free memory between the two peaks: "auto" turns checkpointing on
    capacity = int((plain.peak_bytes + ckpt.peak_bytes) / 2 / memory.HEADROOM)
    monkeypatch.setattr(memory, "host_available_bytes", lambda: capacity - plain.weights_bytes)
    assert checkpointing_on(setup_only(cfg, train, tmp_path / "auto").model)
    # far too little: fail before training, with the numbers
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 1 << 20)
    with pytest.raises(InputError, match=r"This job needs about [\d.]+ GiB peak \(weights .*GiB is free") as err:
        setup_only(cfg, train, tmp_path / "short")
    assert err.value.code == "insufficient_memory"


# --- GPU only ---------------------------------------------------------------------------------


@pytest.mark.skipif(not (HAS_CUDA and HAS_BNB), reason="needs a CUDA GPU and bitsandbytes")
def test_qlora_trains_on_cuda(tmp_path: Path, run_recipe: Callable[..., Run], monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import get_settings

    monkeypatch.setattr(get_settings(), "device", "cuda")
    train = ds.write_jsonl(tmp_path / "train.jsonl", ds.chat_rows(24))
    cfg = make_cfg("tiny-lm", "causal_lm", "qlora", learning_rate=1e-2, batch_size=4)
    hooks = FakeHooks(tmp_path)
    recipe = build_recipe(cfg, hooks, workdir=tmp_path, train_path=train, valid_path=None, resume_dir=None,
                          init_dir=None, base=local_base("tiny-lm"), device="cuda")
    recipe.setup()
    recipe.train()
    assert any(type(p).__name__ == "Params4bit" for p in recipe.model.parameters())
    assert all(p.dtype == torch.float32 for p in recipe.model.parameters() if p.requires_grad)
    assert hooks.losses[-1] < hooks.losses[0]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_fp16_with_loss_scaling_resumes_on_cuda(tmp_path: Path) -> None:
    from tests.ml.training.conftest import at_step

    train = ds.write_jsonl(tmp_path / "train.jsonl", ds.chat_rows(24))
    cfg = make_cfg("tiny-lm", "causal_lm", "lora", precision="fp16", batch_size=4, learning_rate=1e-2)

    def run(resume: Path | None, interrupt: Any = None) -> tuple[Any, FakeHooks]:
        hooks = FakeHooks(tmp_path / f"s{len(list(tmp_path.iterdir()))}", interrupt)
        hooks.store.mkdir()
        recipe = build_recipe(cfg, hooks, workdir=hooks.store, train_path=train, valid_path=None,
                              resume_dir=resume, init_dir=None, base=local_base("tiny-lm"), device="cuda")
        recipe.setup()
        recipe.train()
        return recipe, hooks

    from ml.config import Interrupt

    full, _ = run(None)
    assert full.scaler is not None and full.precision.name == "fp16"
    _, paused = run(None, at_step(3, Interrupt.paused))
    ckpt = paused.checkpoints[-1][0]
    assert (ckpt / "training_state" / "scaler.json").exists()
    resumed, _ = run(ckpt)
    assert resumed.scaler.get_scale() == full.scaler.get_scale()
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, atol=1e-3, rtol=1e-3)
