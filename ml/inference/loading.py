"""Reading checkpoint dirs (the format of `ml.checkpoint`) and building models.

Safetensors only, local files only, never remote code. Everything here is synchronous; the
engine calls it from its worker thread (models) or a helper thread (tokenizers, metadata)."""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from ml import checkpoint
from ml.checkpoint import ADAPTER_WEIGHTS, PROMPT_PEFT_TYPES
from ml.config import Task
from ml.errors import ModelLoadError
from ml.inference.types import BASE_KEY_PREFIX, ModelRef
from ml.modeling import AUTO_CLASSES, SEQUENCE_TASKS, pooling_mode, use_pooling

log = logging.getLogger(__name__)
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}{{ message['role'] }}: {{ message['content'] }}\n{%- endfor -%}"
    "{%- if add_generation_prompt -%}assistant:{%- endif -%}"
)
_LOAD_KW: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}

BaseResolver = Callable[[str], Path]


@dataclass(frozen=True)
class BaseKey:
    """One in-memory base: the same weights with the same task head shape."""

    base_model: str
    task: str
    num_labels: int


@dataclass(frozen=True)
class ModelInfo:
    storage_key: str
    path: Path
    task: str
    base_model: str
    label_names: list[str] | None
    problem_type: str | None
    num_labels: int
    peft_type: str | None  # None: a full model dir
    mixable: bool  # LoRA without DoRA (the cache also checks the modules_to_save types)
    virtual_tokens: int = 0  # prompt tuning: positions the learned prompt takes
    base_checkpoint_key: str | None = None  # adapter trained on a full fine-tune (from_checkpoint)

    @property
    def is_adapter(self) -> bool:
        return self.peft_type is not None

    @property
    def is_catalog_base(self) -> bool:
        """A catalog base model served as itself (its dir is the base's, no checkpoint)."""
        return self.storage_key.startswith(BASE_KEY_PREFIX)

    @property
    def is_prompt(self) -> bool:
        return self.peft_type in PROMPT_PEFT_TYPES

    @property
    def base_key(self) -> BaseKey:
        base = f"checkpoint:{self.base_checkpoint_key}" if self.base_checkpoint_key else self.base_model
        return BaseKey(base, self.task, self.num_labels)


def read_info(path: Path, ref: ModelRef) -> ModelInfo:
    """The dir's `CheckpointInfo`; a dir without one falls back to what the registry row says."""
    meta = checkpoint.read_info(path) if checkpoint.has_info(path) else None
    adapter = checkpoint.adapter_config(path) if checkpoint.is_adapter_dir(path) else None
    task = str(meta.task if meta else ref.task)
    labels = (meta.label_names if meta else None) or ref.label_names
    problem = (meta.problem_type if meta else None) or ref.problem_type
    base = (meta.base_model if meta else None) or ref.base_model
    if adapter is not None and not base:
        raise ModelLoadError(f"Checkpoint '{ref.name}' does not name its base model.")
    if adapter is not None and not (path / ADAPTER_WEIGHTS).exists():  # never fall back to pickles
        raise ModelLoadError(f"Checkpoint '{ref.name}' has no {ADAPTER_WEIGHTS} (safetensors only).")
    return ModelInfo(
        storage_key=ref.storage_key, path=path, task=task, base_model=str(base or ""),
        label_names=list(labels) if labels else None, problem_type=problem,
        num_labels=_num_labels(task, labels, path, adapter is not None),
        peft_type=str(adapter.get("peft_type")) if adapter is not None else None,
        mixable=adapter is not None and adapter.get("peft_type") == "LORA" and not adapter.get("use_dora"),
        virtual_tokens=int((adapter or {}).get("num_virtual_tokens") or 0),
        base_checkpoint_key=meta.base_checkpoint_key if meta is not None and adapter is not None else None,
    )


def _num_labels(task: str, labels: list[str] | None, path: Path, is_adapter: bool) -> int:
    if task == "regression":
        return 1
    if task != "classification":
        return 0
    if labels:
        return len(labels)
    if not is_adapter:
        return int(AutoConfig.from_pretrained(path, **_LOAD_KW).num_labels)
    return _head_rows(path / ADAPTER_WEIGHTS)


def _head_rows(weights: Path) -> int:
    """Label count from the saved task head (modules_to_save) when tunehouse.json has none."""
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
            parts = key.split(".")
            is_head = "classifier" in parts or "score" in parts
            if parts[-1] == "weight" and is_head and "lora_A" not in parts:
                return int(f.get_slice(key).get_shape()[0])
    raise ModelLoadError(f"Cannot tell the number of labels of {weights.parent.name}.")


class Tok:
    """A tokenizer plus a lock: request threads encode while the worker thread decodes."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.lock = threading.Lock()
        # The Rust tokenizer under a fast one, called directly: the Python wrapper around one short text
        # cost ~4x the encoding itself, on the serving process's event loop. Without truncation or
        # padding, as the wrapper sets it for a plain call.
        self._backend: Any = tokenizer.backend_tokenizer if getattr(tokenizer, "is_fast", False) else None
        if self._backend is not None:
            self._backend.no_truncation()
            self._backend.no_padding()

    def encode(self, text: str) -> list[int]:
        with self.lock:
            if self._backend is not None:
                return list(self._backend.encode(text, add_special_tokens=True).ids)
            return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        template = self.tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        with self.lock:
            out = self.tokenizer.apply_chat_template(
                messages, chat_template=template, add_generation_prompt=True, tokenize=True,
                return_dict=True)
        return list(out["input_ids"])

    def decode(self, ids: list[int]) -> str:
        with self.lock:
            return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def token_str(self, token_id: int) -> str:
        with self.lock:
            return str(self.tokenizer.decode([token_id])).strip()


@dataclass
class ModelMeta:
    """Everything request preparation needs, without loading weights."""

    info: ModelInfo
    tok: Tok
    max_positions: int
    eos_ids: set[int] = field(default_factory=set)
    pad_id: int = 0
    mask_id: int | None = None
    mask_token: str | None = None
    is_decoder: bool = True  # left padding + explicit positions; encoders pad on the right

    @property
    def context(self) -> int:
        """Positions left for the request's tokens (0: unknown / unlimited)."""
        return max(0, self.max_positions - self.info.virtual_tokens) if self.max_positions else 0


def load_meta(info: ModelInfo, base_dir: Path | None) -> ModelMeta:
    config_dir = base_dir if info.is_adapter and base_dir is not None else info.path
    tok_dir = info.path if checkpoint.has_tokenizer(info.path) else config_dir
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, **_LOAD_KW)
    config = AutoConfig.from_pretrained(config_dir, **_LOAD_KW)
    eos = _eos_ids(config_dir, config, tokenizer)
    # the trainer pads with eos when a tokenizer has no pad token
    pad = next((p for p in (tokenizer.pad_token_id, tokenizer.eos_token_id) if p is not None),
               min(eos, default=0))
    return ModelMeta(
        info=info, tok=Tok(tokenizer), max_positions=int(getattr(config, "max_position_embeddings", 0) or 0),
        eos_ids=eos, pad_id=int(pad), mask_id=tokenizer.mask_token_id, mask_token=tokenizer.mask_token,
        is_decoder=config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )


def _eos_ids(config_dir: Path, config: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    sources: list[Any] = [getattr(config, "eos_token_id", None), tokenizer.eos_token_id]
    if (config_dir / "generation_config.json").exists():
        sources.append(GenerationConfig.from_pretrained(config_dir, **_LOAD_KW).eos_token_id)
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list):
            ids.update(int(x) for x in src)
    return ids


def _task_kwargs(task: str, num_labels: int, problem_type: str | None, pad_id: int | None) -> dict[str, Any]:
    """As the trainer builds it: label count, problem type, and the tokenizer's pad id (decoder
    classifiers find each row's last token with it)."""
    pad = {"pad_token_id": pad_id} if pad_id is not None else {}
    if task == "regression":
        return {"num_labels": 1, "problem_type": "regression", **pad}
    if task == "classification":
        kind = {"problem_type": problem_type} if problem_type else {}
        return {"num_labels": num_labels, **kind, **pad}
    return {}


def dtype_for(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_base(base_dir: Path, info: ModelInfo, device: torch.device,
              pad_id: int | None = None) -> PreTrainedModel:
    """The shared base with a freshly initialised head: every adapter brings its own head."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AUTO_CLASSES[Task(info.task)].from_pretrained(
            base_dir, dtype=dtype_for(device), use_safetensors=True,
            **_task_kwargs(info.task, info.num_labels, info.problem_type, pad_id), **_LOAD_KW)
    return _ready(model, device, base_dir, info.task)


def load_full(info: ModelInfo, device: torch.device) -> PreTrainedModel:
    model = AUTO_CLASSES[Task(info.task)].from_pretrained(
        info.path, dtype=dtype_for(device), use_safetensors=True, **_LOAD_KW)
    return _ready(model, device, info.path, info.task)


def _ready(model: PreTrainedModel, device: torch.device, path: Path, task: str) -> PreTrainedModel:
    if Task(task) in SEQUENCE_TASKS:
        use_pooling(model, pooling_mode(model, path))  # as training pooled (`ml.modeling`)
    torch.nn.Module.to(model, device)
    model.eval()
    model.requires_grad_(False)
    return model


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A second module tree over the same tensors: peft can inject into it without touching
    the pristine base, and nothing is duplicated in memory."""
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)
