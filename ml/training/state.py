"""Training state on disk (`<checkpoint>/training_state/`), safetensors + JSON only (no pickle):

optimizer.safetensors  every tensor of the optimizer state ("state.<param index>.<name>")
optimizer.json         param_groups and the non-tensor per-param state
scheduler.json         LR scheduler state_dict
rng.safetensors        torch CPU/CUDA generator states + numpy/python MT states (scalars in metadata)
trainer_state.json     step, epoch, position in the epoch, early-stopping and logging counters
scaler.json            fp16 training only: the loss scaler's scale and growth tracker
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file

SCALER_FILE = "scaler.json"


@dataclass
class RngState:
    torch_cpu: torch.Tensor
    numpy: tuple[Any, ...]
    python: tuple[Any, ...]
    torch_cuda: list[torch.Tensor] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> RngState:
    cuda = [t.clone() for t in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    np_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    return RngState(torch.get_rng_state().clone(), np_state, random.getstate(), cuda)


def restore_rng(rng: RngState) -> None:
    torch.set_rng_state(rng.torch_cpu)
    if rng.torch_cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng.torch_cuda)
    np.random.set_state(rng.numpy)
    random.setstate(rng.python)


def save_state(
    out: Path, optimizer: torch.optim.Optimizer, scheduler: Any, rng: RngState, trainer_state: dict[str, Any],
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(out / "optimizer.safetensors"))
    _write_json(out / "optimizer.json", meta)
    _write_json(out / "scheduler.json", scheduler.state_dict())
    _save_rng(out / "rng.safetensors", rng)
    _write_json(out / "trainer_state.json", trainer_state)
    if scaler is not None:
        _write_json(out / SCALER_FILE, scaler.state_dict())


def load_state(
    src: Path, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler | None = None
) -> tuple[RngState, dict[str, Any]]:
    """Loads optimizer, scheduler (and the loss scaler, when both sides have one) in place; returns the
    RNG states and the trainer state."""
    meta = json.loads((src / "optimizer.json").read_text())
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(src / "optimizer.safetensors")), meta))
    scheduler.load_state_dict(json.loads((src / "scheduler.json").read_text()))
    if scaler is not None and (src / SCALER_FILE).exists():
        scaler.load_state_dict(json.loads((src / SCALER_FILE).read_text()))
    return _load_rng(src / "rng.safetensors"), json.loads((src / "trainer_state.json").read_text())


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    extras: dict[str, dict[str, Any]] = {}
    for pid, per_param in sd["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                extras.setdefault(str(pid), {})[name] = value
    keys = {str(pid): list(per_param) for pid, per_param in sd["state"].items()}
    return tensors, {"param_groups": sd["param_groups"], "state_keys": keys, "state_extras": extras}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for pid, names in meta["state_keys"].items():
        extras = meta["state_extras"].get(pid, {})
        state[int(pid)] = {n: tensors[f"state.{pid}.{n}"] if n not in extras else extras[n] for n in names}
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _save_rng(path: Path, rng: RngState) -> None:
    kind, keys, pos, has_gauss, cached = rng.numpy
    version, mt, gauss_next = rng.python
    tensors = {
        "torch_cpu": rng.torch_cpu,
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "python_mt": torch.tensor(mt, dtype=torch.int64),
        **{f"torch_cuda.{i}": t.cpu() for i, t in enumerate(rng.torch_cuda)},
    }
    metadata = {
        "numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)]),
        "python": json.dumps([version, gauss_next]),
        "n_cuda": str(len(rng.torch_cuda)),
    }
    save_file(tensors, str(path), metadata=metadata)


def _load_rng(path: Path) -> RngState:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(path))
    kind, pos, has_gauss, cached = json.loads(metadata["numpy"])
    version, gauss_next = json.loads(metadata["python"])
    np_state = (kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached)
    py_state = (version, tuple(int(x) for x in tensors["python_mt"].tolist()), gauss_next)
    cuda = [tensors[f"torch_cuda.{i}"] for i in range(int(metadata["n_cuda"]))]
    return RngState(tensors["torch_cpu"], np_state, py_state, cuda)
