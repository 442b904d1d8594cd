"""The recipe's view of a torch.distributed process group (`ml.training.launch` starts one per device).

Data parallel only (DDP): every rank holds the whole model, takes its share of each global micro-batch
(`shard`) and the gradients are averaged by DDP. The batch plan stays a function of (seed, epoch, step),
never of the world size, so 1 process x batch B and N processes x B/N see the same examples per
optimizer step and a checkpoint resumes under any world size. Rank 0 alone reports and saves; every
decision that changes the control flow (interrupt, early stop, budget) is rank 0's, broadcast, so
ranks never disagree on which collective comes next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    backend: str = "none"

    @classmethod
    def current(cls) -> World:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))
        return cls()

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def shard(self, idx: list[int]) -> tuple[list[int], bool]:
        """This rank's rows of a global micro-batch, and whether they count. A rank left without rows
        (a last batch smaller than the world) runs one row with zero weight: DDP needs every rank's
        backward."""
        mine = idx[self.rank :: self.size]
        return (mine, True) if mine else (idx[:1], False)

    def sum(self, *values: float) -> list[float]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(v) for v in t.tolist()]

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

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.size, "strategy": "ddp" if self.distributed else "single",
                "backend": self.backend}
