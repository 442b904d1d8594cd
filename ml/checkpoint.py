"""The checkpoint format: the one module that knows its file names and its metadata. Training writes
it, inference and weight downloads read it, tests build checkpoints through it.

    <dir>/tunehouse.json          CheckpointInfo as JSON (task, training type, base model, labels, ...)
    <dir>/config.json             model config (full / freeze) -- or adapter_config.json (lora / prompt tuning)
    <dir>/model.safetensors       full weights (full / freeze) -- or adapter_model.safetensors (peft adapters,
                                  the task head included via modules_to_save)
    <dir>/tokenizer.json ...      tokenizer files (always)
    <dir>/training_state/         optimizer, scheduler, RNG and loop position (`ml.training.state`):
                                  enough to resume bit-for-bit. Safetensors and JSON only, never pickles.

Importing this module does not import torch: the API reads metadata and file names through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ml.config import Task, TrainingKind

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

INFO_FILE = "tunehouse.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_WEIGHTS = "model.safetensors"
STATE_DIR = "training_state"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
PROMPT_PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING")
# What a download never contains: resume state, storage markers, generated model cards.
NOT_EXPORTED = frozenset({STATE_DIR, "_COMPLETE", "README.md"})


class CheckpointInfo(BaseModel):
    task: Task
    training_type: TrainingKind
    base_model: str  # a catalog id, never a local path
    step: int
    epoch: float
    metrics: dict[str, float] = {}
    label_names: list[str] | None = None  # classification: index -> label
    problem_type: str | None = None
    # An adapter trained on a full fine-tune (from_checkpoint): the storage key of those base weights.
    base_checkpoint_key: str | None = None


def save(ckpt_dir: Path, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, info: CheckpointInfo,
         state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Weights (full model or peft adapter), tokenizer and info: everything but the training state.
    `state_dict`: the model's weights when `model` does not hold them whole (FSDP: gathered to rank 0)."""
    from ml.modeling import save_weights  # torch: only when actually writing

    save_weights(model, ckpt_dir, info.base_model, state_dict)
    tokenizer.save_pretrained(str(ckpt_dir))
    write_info(ckpt_dir, info)


def has_info(ckpt_dir: Path) -> bool:
    return (ckpt_dir / INFO_FILE).is_file()


def read_info(ckpt_dir: Path) -> CheckpointInfo:
    return CheckpointInfo.model_validate_json((ckpt_dir / INFO_FILE).read_text())


def write_info(ckpt_dir: Path, info: CheckpointInfo) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / INFO_FILE).write_text(info.model_dump_json(indent=2))


def has_tokenizer(path: Path) -> bool:
    return any((path / name).exists() for name in TOKENIZER_FILES)


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).exists()


def adapter_config(path: Path) -> dict[str, Any]:
    data = json.loads((path / ADAPTER_CONFIG).read_text())
    return data if isinstance(data, dict) else {}


def adapter_kind(path: Path) -> str:
    """peft's type of the adapter in `path` (LORA, PROMPT_TUNING, ...)."""
    return str(adapter_config(path).get("peft_type", ""))


def has_training_state(ckpt_dir: Path) -> bool:
    return (ckpt_dir / STATE_DIR).is_dir()


def state_dir(ckpt_dir: Path) -> Path:
    return ckpt_dir / STATE_DIR
