"""Base models: what the catalog says of one (`BaseModelSpec`) and where its weights live locally.
Nothing is ever downloaded: sources are a Python package that ships weights (`package:`), a model
built locally from a config (`builtin:`), or a local directory (`path:`)."""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

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

    @property
    def is_decoder(self) -> bool:
        return self.architecture == "decoder"


@dataclass(frozen=True)
class LocalBase:
    """A base model ready to load: its catalog entry and its local directory."""

    spec: BaseModelSpec
    path: Path


def local_path(spec: BaseModelSpec, data_dir: Path) -> Path:
    """Local directory with config, tokenizer and safetensors weights; `builtin:` models are built
    once into `<data_dir>/base_models/<id>`."""
    kind, _, ref = spec.source.partition(":")
    if kind == "package":
        module = importlib.import_module(ref)
        return Path(module.get_model_path())
    if kind == "path":
        return Path(ref)
    if kind == "builtin":
        dst = data_dir.resolve() / "base_models" / spec.id
        with _build_lock:
            if not (dst / "config.json").exists():
                from ml.models.builtin import build

                build(ref, dst)
        return dst
    raise ValueError(f"unknown model source {spec.source!r}")
