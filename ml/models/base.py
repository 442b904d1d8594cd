"""Base models: what the catalog says of one (`BaseModelSpec`) and where its weights live locally.
Nothing is ever downloaded: sources are a Python package that ships weights (`package:`), a model
built locally from a config (`builtin:`), a GGUF file shipped in a Python package and converted once
(`gguf:<module>/<file>`, checked against the spec's `sha256`), or a local directory (`path:`)."""

from __future__ import annotations

import fcntl
import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, field_validator

from ml.config import TrainingKind


class BaseModelSpec(BaseModel):
    id: str
    description: str = ""
    source: str
    sha256: str | None = None  # of the source file, for sources converted locally (`gguf:`)
    architecture: str  # encoder | decoder
    tasks: list[str]
    training_types: list[str]
    max_seq_length: int = 512
    lora_target_modules: list[str] = []
    learning_rate_scale: float = 1.0  # tiny randomly initialised models want larger steps
    # Default learning rate per training type, measured for this model (`bench/quality.py`); a type
    # not listed gets the service-wide base rate times `learning_rate_scale`.
    learning_rates: dict[str, float] = {}
    # LM tasks whose output head ships with the weights; None: all of them. Any other LM task starts
    # from a new, randomly initialised head (e.g. a sentence-embedding model has no masked-LM head).
    pretrained_heads: list[str] | None = None

    @field_validator("learning_rates")
    @classmethod
    def _learning_rates(cls, v: dict[str, float]) -> dict[str, float]:
        for kind, lr in v.items():
            if kind not in TrainingKind.__members__ or not 0 < lr <= 1:
                raise ValueError(f"learning_rates: {kind!r}: {lr} (a training type and a rate in (0, 1])")
        return v

    @property
    def is_decoder(self) -> bool:
        return self.architecture == "decoder"

    def new_head(self, task: str) -> bool:
        """True when training `task` (an LM task) starts from a head that was never trained."""
        lm_task = task in ("causal_lm", "masked_lm")
        return lm_task and self.pretrained_heads is not None and task not in self.pretrained_heads


@dataclass(frozen=True)
class LocalBase:
    """A base model ready to load: its catalog entry and its local directory."""

    spec: BaseModelSpec
    path: Path


def local_path(spec: BaseModelSpec, data_dir: Path) -> Path:
    """Local directory with config, tokenizer and safetensors weights; `builtin:` and `gguf:` models
    are built once into `<data_dir>/base_models/<id>`."""
    kind, _, ref = spec.source.partition(":")
    if kind == "package":
        module = importlib.import_module(ref)
        return Path(module.get_model_path())
    if kind == "path":
        return Path(ref)
    dst = data_dir.resolve() / "base_models" / spec.id
    if kind == "builtin":
        from ml.models import builtin

        _build_once(dst, lambda: (dst / "config.json").exists(), lambda: builtin.build(ref, dst))
        return dst
    if kind == "gguf":
        from ml.models import gguf

        if not spec.sha256:
            raise ValueError(f"model {spec.id!r}: a gguf source needs the file's sha256 in the catalog")
        sha256 = spec.sha256
        _build_once(dst, lambda: gguf.is_converted(dst, sha256),
                    lambda: gguf.convert(gguf.package_file(ref), dst, sha256))
        return dst
    raise ValueError(f"unknown model source {spec.source!r}")


def _build_once(dst: Path, done: Callable[[], bool], build: Callable[[], None]) -> None:
    """Build `dst` unless it is done; one builder at a time across threads and processes (workers)."""
    if done():
        return
    with _file_lock(dst.parent / f".{dst.name}.lock"):
        if not done():  # another process may have built it while we waited
            build()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:  # flock is per open file: threads of one process exclude each other too
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
