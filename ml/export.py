"""Merged weights for download: a LoRA checkpoint folded into its base model (`merge_and_unload`) and
saved as a plain transformers model directory (safetensors, config, tokenizer and the checkpoint's
info file). Pure library: explicit paths in, files out; the caller owns storage and bookkeeping.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ml.checkpoint import INFO_FILE, adapter_kind, is_adapter_dir, read_info
from ml.modeling import load_adapter, load_task_model, load_tokenizer, quiet_transformers


def merge_lora(ckpt: Path, base_dir: Path, out: Path) -> None:
    """Writes into `out` (an existing, empty directory) the model `ckpt` (a LoRA checkpoint) makes of
    the base weights in `base_dir`."""
    if not is_adapter_dir(ckpt) or adapter_kind(ckpt) != "LORA":
        raise ValueError(f"{ckpt.name} is not a LoRA checkpoint: only LoRA adapters can be merged")
    info = read_info(ckpt)
    tok = load_tokenizer(ckpt)
    base = load_task_model(info.task, base_dir, tok, info.label_names)
    merged = load_adapter(base, ckpt, trainable=False).merge_and_unload()
    with quiet_transformers():  # transformers 5 writes safetensors only (safe_serialization is gone)
        merged.save_pretrained(str(out))
        tok.save_pretrained(str(out))
    shutil.copyfile(ckpt / INFO_FILE, out / INFO_FILE)  # task, labels, base model: as trained
