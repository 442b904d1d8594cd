"""The recipe's view of a torch.distributed process group (`ml.training.launch` starts one per device).

Data parallel, in one of two strategies. DDP: every rank holds the whole model and optimizer, and the
gradients are all-reduced. FSDP (FSDP2 `fully_shard`, full fine-tunes): every rank holds 1/N of the
parameters, gradients and optimizer state; each transformer block's weights are all-gathered for its
forward and backward and its gradients reduce-scattered. Either way every rank takes its share of each
global micro-batch (`shard`). The batch plan stays a function of (seed, epoch, step),
never of the world size, so 1 process x batch B and N processes x B/N see the same examples per
optimizer step and a checkpoint resumes under any world size. Rank 0 alone reports and saves; every
decision that changes the control flow (interrupt, early stop, budget) is rank 0's, broadcast, so
ranks never disagree on which collective comes next.

Checkpoints are one consolidated format whatever the strategy (`ml.checkpoint`): under FSDP the full
weights and optimizer state are gathered to rank 0's CPU memory, which saves them like a single process
would, so a checkpoint resumes under any world size and strategy and exports stay plain safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    backend: str = "none"
    strategy: str = "single"  # "ddp" or "fsdp" in a group

    @classmethod
    def current(cls, strategy: str = "auto") -> World:
        if dist.is_available() and dist.is_initialized():
            size = dist.get_world_size()
            # "auto" is DDP: one all-reduce a step beats gathering every block twice while the model fits
            chosen = "single" if size == 1 else "fsdp" if strategy == "fsdp" else "ddp"
            return cls(dist.get_rank(), size, str(dist.get_backend()), chosen)
        return cls()

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def sharded(self) -> bool:
        """FSDP: no rank holds the whole model, so forwards (evaluation) and saves involve every rank."""
        return self.strategy == "fsdp"

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def shard(self, idx: list[int]) -> tuple[list[int], bool]:
        """This rank's rows of a global micro-batch, and whether they count. A rank left without rows
        (a last batch smaller than the world) runs one row with zero weight: DDP and FSDP need every
        rank's backward."""
        mine = idx[self.rank :: self.size]
        return (mine, True) if mine else (idx[:1], False)

    def sum(self, *values: float) -> list[float]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(v) for v in t.tolist()]

    def gather_all(self, value: float) -> list[float]:
        """Every rank's `value`, by rank, on every rank."""
        if not self.distributed:
            return [value]
        out = [torch.zeros(1, dtype=torch.float64, device=self._device()) for _ in range(self.size)]
        dist.all_gather(out, torch.tensor([value], dtype=torch.float64, device=self._device()))
        return [float(t.item()) for t in out]

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-D `t` (lengths may differ), concatenated in rank order, on every rank, as
        float64 (exact for class indices)."""
        if not self.distributed:
            return t.double()
        sizes = [int(n) for n in self.gather_all(float(t.numel()))]
        if max(sizes) == 0:
            return torch.zeros(0, dtype=torch.float64)
        padded = torch.zeros(max(sizes), dtype=torch.float64, device=self._device())
        padded[: t.numel()] = t.to(padded.device, torch.float64)
        out = [torch.zeros_like(padded) for _ in sizes]
        dist.all_gather(out, padded)
        return torch.cat([o[:n] for o, n in zip(out, sizes, strict=True)]).cpu()

    def agree(self, value: int) -> int:
        """Rank 0's `value`, on every rank."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._device())
        dist.broadcast(t, src=0)
        return int(t.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def describe(self, model: torch.nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = {"world_size": self.size, "strategy": self.strategy, "backend": self.backend}
        if self.sharded:  # this rank's shards: about 1/N of the model
            out["parameters_on_rank"] = sum(_local(p).numel() for p in model.parameters())
        return out

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """What the training forward runs: the model itself (one process, or FSDP, which shards it in
        place), or DDP over it."""
        if self.sharded:
            return fully_shard_blocks(model, device)
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated layers: the modules transformers never splits across devices (`_no_split_modules`
    names their classes, e.g. LlamaDecoderLayer), found on the model or any submodule (peft, heads)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def fully_shard_blocks(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2 in place: one unit per transformer block (all-gathered just for its forward and backward,
    so at most about one block is whole at a time), then the root for what is left (embeddings, norms,
    head). Parameters stay fp32 and gradients are reduced in fp32: autocast casts the compute, as under
    DDP, so both strategies take the same steps. Gradients are reduce-scattered at every backward
    (FSDP2 has no `no_sync`): they accumulate sharded, which is the memory FSDP is for."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the whole state dict on rank 0's CPU (every rank must call it; the others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options))
    # Tied weights (lm_head = embed_tokens) come back as separate copies: share them again, so that
    # save_pretrained drops the alias as it does for a plain model
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in full and first.setdefault(id(param), name) != name:
            full[name] = full[first[id(param)]]
    return full


class ConsolidatedOptimizer:
    """The optimizer as `ml.training.state` sees it under FSDP: `state_dict()` is the full state keyed by
    parameter index exactly like a plain optimizer's (so the files are the same under any strategy and
    world size) and `load_state_dict` shards such a state back onto this rank.

    The whole optimizer state passes through rank 0's CPU memory (2x the fp32 weights for AdamW), which is
    fine for the model sizes this service trains. For models whose optimizer state does not fit one
    host, `gather` and `load_state_dict` are where a sharded save would go instead:
    `torch.distributed.checkpoint.save` of the sharded state dicts (each rank writes its own shards) and
    `dcp.load` + `set_*_state_dict` on resume, at the cost of a second checkpoint format."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self._full: dict[str, Any] | None = None

    def gather(self) -> None:
        """Collective: rank 0 keeps the consolidated state for the next `state_dict()`."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = cast(dict[str, Any], get_optimizer_state_dict(self.model, self.optimizer, options=options))
        self._full = _by_index(full) if full else None

    def state_dict(self) -> dict[str, Any]:
        if self._full is None:
            raise RuntimeError("gather() first, on every rank; only rank 0 holds the state")
        full, self._full = self._full, None
        return full

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Collective: every rank passes the same full state (read from the checkpoint) and keeps its shard."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        by_name = _by_name(state, _parameter_names(self.optimizer, self.model))
        set_optimizer_state_dict(self.model, self.optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    def as_optimizer(self) -> torch.optim.Optimizer:
        return cast(torch.optim.Optimizer, self)  # `ml.training.state` only calls (load_)state_dict


def _parameter_names(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[str]:
    """Name of every optimizer parameter in index order (a plain optimizer's state_dict numbers them
    group after group)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _by_index(full: dict[str, Any]) -> dict[str, Any]:
    """get_optimizer_state_dict keys by parameter name; a plain optimizer by index."""
    order = [name for group in full["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    state = {index[name]: per_param for name, per_param in full["state"].items()}
    groups = [g | {"params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
    return {"state": state, "param_groups": groups}


def _by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    groups = [g | {"params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[int(i)]: v for i, v in state["state"].items()}, "param_groups": groups}
