"""Training recipes. `build_recipe` (the `RecipeFactory` of `ml.config`) imports the recipe lazily so
that importing this package does not pull in torch and transformers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ml.config import Hooks, RecipeConfig
    from ml.models.base import LocalBase
    from ml.training.recipe import TrainingRecipe

__all__ = ["build_recipe"]


def build_recipe(
    cfg: RecipeConfig,
    hooks: Hooks,
    *,
    workdir: Path,
    train_path: Path,
    valid_path: Path | None,
    resume_dir: Path | None,
    init_dir: Path | None,
    base: LocalBase,
    device: str = "auto",
) -> TrainingRecipe:
    from ml.training.recipe import TrainingRecipe

    return TrainingRecipe(
        cfg,
        hooks,
        workdir=workdir,
        train_path=train_path,
        valid_path=valid_path,
        resume_dir=resume_dir,
        init_dir=init_dir,
        base=base,
        device=device,
    )
