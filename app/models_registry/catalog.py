"""Base-model catalog (a JSON config file) and where each base model's weights live locally.
Nothing is ever downloaded: sources are a Python package that ships weights, a model built
locally from a config (`builtin:`), or a local directory (`path:`)."""

from __future__ import annotations

import importlib
import json
import threading
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel

from app.kit.errors import InvalidRequest, NotFound
from app.settings import get_settings

BUNDLED_CATALOG = Path(__file__).with_name("catalog.json")
_build_lock = threading.Lock()


class BaseModelSpec(BaseModel):
    id: str
    description: str = ""
    source: str
    architecture: str  # encoder | decoder
    tasks: list[str]
    training_types: list[str]
    max_seq_length: int = 512
    lora_target_modules: list[str] = []
    learning_rate_scale: float = 1.0  # tiny randomly initialised models want larger steps


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
    kind, _, ref = spec.source.partition(":")
    if kind == "package":
        module = importlib.import_module(ref)
        return Path(module.get_model_path())
    if kind == "path":
        return Path(ref)
    if kind == "builtin":
        dst = get_settings().data_dir.resolve() / "base_models" / spec.id
        with _build_lock:
            if not (dst / "config.json").exists():
                from app.models_registry.builtin import build

                build(ref, dst)
        return dst
    raise ValueError(f"unknown model source {spec.source!r}")
