"""The base-model catalog (a JSON config file, `settings.catalog_path`): which base models this
service offers, and for which tasks and training types. Specs and local paths are `ml.models.base`."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from app.kit.errors import InvalidRequest, NotFound
from app.settings import get_settings
from ml.models.base import BaseModelSpec, LocalBase, local_path

BUNDLED_CATALOG = Path(__file__).with_name("catalog.json")

__all__ = ["BaseModelSpec", "base_model_path", "check_supports", "get_spec", "load_catalog", "local_base"]


@lru_cache
def load_catalog() -> dict[str, BaseModelSpec]:
    path = get_settings().catalog_path or BUNDLED_CATALOG
    raw = json.loads(Path(path).read_text())
    return {m["id"]: BaseModelSpec.model_validate(m) for m in raw["models"]}


def get_spec(model_id: str, param: str = "model") -> BaseModelSpec:
    spec = load_catalog().get(model_id)
    if spec is None:
        known = ", ".join(sorted(load_catalog()))
        raise NotFound(f"The model '{model_id}' does not exist. Base models: {known}.", param=param,
                       code="model_not_found")
    return spec


def check_supports(spec: BaseModelSpec, task: str, training_type: str) -> None:
    if task not in spec.tasks:
        raise InvalidRequest(f"Model '{spec.id}' does not support task '{task}'; it supports "
                             f"{', '.join(spec.tasks)}.", param="task", code="unsupported_task")
    if training_type not in spec.training_types:
        raise InvalidRequest(f"Model '{spec.id}' does not support training type '{training_type}'.",
                             param="training_type", code="unsupported_training_type")


def base_model_path(spec: BaseModelSpec) -> Path:
    """Local directory with config, tokenizer and safetensors weights for a base model."""
    return local_path(spec, get_settings().data_dir)


def local_base(model_id: str) -> LocalBase:
    spec = get_spec(model_id)
    return LocalBase(spec, base_model_path(spec))
