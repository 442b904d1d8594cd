"""The base-model catalog: which base models this service offers, and for which tasks and training
types. The shipped catalog (a JSON file, `settings.catalog_path`) plus the models an operator
registered from local directories (`tunehouse models add`, kept in `settings.resolved_models_file`,
re-read when it changes). Specs and local paths are `ml.models.base`."""

from __future__ import annotations

import json
import os
import threading
from functools import lru_cache
from pathlib import Path

from app.kit.errors import InvalidRequest, NotFound
from app.settings import get_settings
from ml.models.base import BaseModelSpec, LocalBase, local_path

BUNDLED_CATALOG = Path(__file__).with_name("catalog.json")

__all__ = ["BaseModelSpec", "base_model_path", "check_supports", "get_spec", "load_catalog", "local_base"]


@lru_cache
def _shipped() -> dict[str, BaseModelSpec]:
    return _read(Path(get_settings().catalog_path or BUNDLED_CATALOG))


def _read(path: Path) -> dict[str, BaseModelSpec]:
    raw = json.loads(path.read_text())
    return {m["id"]: BaseModelSpec.model_validate(m) for m in raw["models"]}


_registered: tuple[tuple[str, float, int], dict[str, BaseModelSpec]] | None = None
_registered_lock = threading.Lock()


def registered_models() -> dict[str, BaseModelSpec]:
    """Operator-registered models, cached until the file changes (a stat per call)."""
    global _registered
    path = get_settings().resolved_models_file
    try:
        st = path.stat()
    except FileNotFoundError:
        return {}
    stamp = (str(path), st.st_mtime, st.st_size)
    with _registered_lock:
        if _registered is None or _registered[0] != stamp:
            _registered = (stamp, _read(path))
        return _registered[1]


def load_catalog() -> dict[str, BaseModelSpec]:
    return {**registered_models(), **_shipped()}


def register_model(spec: BaseModelSpec) -> None:
    """Add (or replace) an operator model; the file is rewritten atomically."""
    if spec.id in _shipped():
        raise InvalidRequest(f"'{spec.id}' is a shipped base model; pick another id.", param="id")
    models = {**registered_models(), spec.id: spec}
    _write(models)


def unregister_model(model_id: str) -> None:
    models = dict(registered_models())
    if models.pop(model_id, None) is None:
        raise NotFound(f"No registered model '{model_id}'.", param="id", code="model_not_found")
    _write(models)


def _write(models: dict[str, BaseModelSpec]) -> None:
    path = get_settings().resolved_models_file
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"models": [m.model_dump(mode="json", exclude_defaults=True) | {"id": m.id} for m in models.values()]}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, path)


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
