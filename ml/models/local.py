"""Checking a local model directory an operator registers as a base model: safetensors weights only,
an architecture this transformers knows, no remote code, a tokenizer. Reads files and
transformers' tables; never loads the weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.errors import InputError

UNSAFE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json")


@dataclass(frozen=True)
class ModelDir:
    model_type: str
    architecture: str  # decoder | encoder
    tasks: list[str]
    max_positions: int
    lora_target_modules: list[str]
    has_chat_template: bool
    pretrained_heads: list[str] | None  # None: every LM head ships (see BaseModelSpec)


def _has_mlm_head(path: Path) -> bool:
    """Whether the weights hold a masked-LM head (BERT-style `cls.predictions`, or `lm_head`)."""
    from safetensors import safe_open

    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="numpy") as f:
            if any(".predictions." in k or k.startswith(("lm_head", "cls.")) for k in f.keys()):  # noqa: SIM118
                return True
    return False


def _config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise InputError(f"{path} has no config.json: not a transformers model directory", param="path")
    data = json.loads(file.read_text())
    if not isinstance(data, dict):
        raise InputError(f"{file} is not a JSON object", param="path")
    return data


def _check_files(path: Path, config: dict[str, Any]) -> None:
    if "auto_map" in config:
        raise InputError("the model needs custom code (config.json has auto_map); tunehouse never runs "
                         "remote code", param="path")
    if not any(path.glob("*.safetensors")):
        unsafe = sorted(p.name for pattern in UNSAFE_WEIGHTS for p in path.glob(pattern))
        hint = f" (found {', '.join(unsafe[:3])}: convert them to safetensors)" if unsafe else ""
        raise InputError(f"{path} has no .safetensors weights{hint}", param="path")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)})", param="path")


def inspect_model_dir(path: Path) -> ModelDir:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA_TARGETS
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    path = path.resolve()
    config = _config(path)
    model_type = str(config.get("model_type", ""))
    if model_type not in CONFIG_MAPPING_NAMES:
        raise InputError(f"unknown architecture {model_type!r} in {path / 'config.json'}", param="path")
    _check_files(path, config)
    decoder = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    tasks = ["causal_lm"] if decoder else []
    if model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        tasks += ["classification", "regression"]
    if not decoder and model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        tasks.append("masked_lm")
    if not tasks:
        raise InputError(f"{model_type!r} models support none of tunehouse's tasks", param="path")
    tok_config = path / "tokenizer_config.json"
    chat = tok_config.is_file() and "chat_template" in json.loads(tok_config.read_text())
    heads: list[str] | None = None if decoder or _has_mlm_head(path) else []
    return ModelDir(model_type=model_type, architecture="decoder" if decoder else "encoder", tasks=tasks,
                    max_positions=int(config.get("max_position_embeddings") or 512),
                    lora_target_modules=list(LORA_TARGETS.get(model_type, [])),
                    has_chat_template=chat or (path / "chat_template.jinja").is_file(), pretrained_heads=heads)
