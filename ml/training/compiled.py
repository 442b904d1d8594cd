"""Training beyond eager PyTorch: a fused AdamW and `torch.compile` of the training forward.

The compiled module wraps the one the training forward runs (`TrainingRecipe.net`) and shares its
parameters, so checkpoints, evaluation and resume work on the plain model as before. Length-grouped
batches change the sequence length (and the last batch the row count) from step to step: the graph is
compiled with dynamic shapes, so a handful of compilations cover a run instead of one per length.
Inductor's kernels are not bit-identical to eager ones (different fusion and reduction order), so a
compiled run matches an eager one within float tolerance; compiled runs resume exactly (the dropout
masks are drawn from the restored torch RNG).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any, Literal

import torch

CompileSetting = bool | Literal["auto"]
# `auto` compiles on a device listed here when the run has at least that many steps: the point where
# bench/train_compile.py measured the compiled run (compilation included) overtaking eager. On CPU it
# never did for the jobs this service runs (compiling minilm-l6 costs ~130 CPU-s, longer than training
# thousands of examples eagerly), so CPU is not listed; CUDA is not listed until the bench has run there.
AUTO_MIN_STEPS: dict[str, int] = {}


@dataclass(frozen=True)
class Plan:
    on: bool
    why: str  # a sentence for the job's events


def plan(setting: CompileSetting, device: torch.device, total_steps: int, blocker: str | None) -> Plan:
    """Whether to compile. `blocker` is the recipe's reason compilation cannot apply to this job:
    `compile: true` then fails the job with it (before any training), `auto` stays eager."""
    from ml.errors import InputError

    if setting is False:
        return Plan(False, "eager")
    blocker = blocker or unsupported(device)
    if blocker is not None:
        if setting is True:
            raise InputError(f"compile: {blocker}; use compile: auto or false", param="compile")
        return Plan(False, f"eager ({blocker})")
    if setting is True:
        return Plan(True, "torch.compile (requested)")
    least = AUTO_MIN_STEPS.get(device.type)
    if least is None or total_steps < least:
        where = f"{total_steps} steps" if least is not None else f"{device.type} training"
        return Plan(False, f"eager (auto: compiling does not pay for {where})")
    return Plan(True, f"torch.compile (auto: {total_steps} steps on {device.type})")


def unsupported(device: torch.device) -> str | None:
    if device.type not in ("cpu", "cuda"):
        return f"torch.compile is not set up for {device.type} workers"
    if device.type == "cpu" and not _cxx():
        return "torch.compile needs a C++ compiler on CPU workers (none found)"
    return None


def _cxx() -> str | None:
    return next((p for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and (p := shutil.which(c))), None)


BACKEND = "inductor"  # tests swap in "aot_eager": the same capture and autograd, without minutes of C++ builds


def compile_module(net: torch.nn.Module) -> Any:
    """The compiled forward. `dynamic=True` marks sizes dynamic from the first call: one graph covers
    every batch shape instead of a recompilation per sequence length until the limit is hit. A worker
    trains one job at a time: the previous jobs' graphs are dropped so that they do not count against
    dynamo's recompile limit (past it, the forward silently runs eager)."""
    torch._dynamo.reset()
    return torch.compile(net, dynamic=True, backend=BACKEND)


def checkpointing_on(model: torch.nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.AdamW:
    """AdamW updating all parameters in one fused kernel (CPU and CUDA have one) instead of a Python
    loop over tensors; foreach (batched ops) where fused is not available."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=lr, foreach=True)
