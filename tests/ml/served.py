"""Checkpoints loaded the way serving loads them: through the inference `Engine` (its cache, its loaders)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import TracebackType

import torch

from app.models_registry.catalog import local_base
from ml.inference.engine import Engine, EngineConfig
from ml.inference.loading import ModelMeta
from ml.inference.types import ModelRef


class PathStore:
    """Storage keys are the checkpoint paths themselves."""

    @staticmethod
    def local_dir(key: str) -> Path:
        return Path(key)


class Served:
    """One checkpoint dir in an engine of its own; `logits(ids)` runs a row as a prediction would."""

    def __init__(self, ckpt: Path, task: str, device: str = "cpu") -> None:
        self.engine = Engine(EngineConfig(device=device), base_dir=lambda base: local_base(base).path,
                             storage=PathStore())
        ref = ModelRef(name=ckpt.name, storage_key=str(ckpt), task=task)
        self.meta: ModelMeta = asyncio.run(self.engine.meta(ref))

    def logits(self, ids: list[int]) -> torch.Tensor:
        return asyncio.run(self.engine.logits(self.meta, ids))

    def __enter__(self) -> Served:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.engine.close()


def rows(batch: dict[str, torch.Tensor], n: int = 4) -> list[torch.Tensor]:
    """The first `n` rows of a collated batch without their padding."""
    mask = batch["attention_mask"].bool()
    return [batch["input_ids"][i][mask[i]] for i in range(min(n, len(mask)))]
