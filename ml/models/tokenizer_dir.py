"""A base model's tokenizer files without its weights, torch-free: what the API needs to count tokens.

`package:` and `path:` sources are their model directory. A `builtin:` model is built (weights and all,
with torch) by whoever first trains on it; until then its tokenizer alone is built here, into
`<data_dir>/base_models/<id>.tokenizer` -- the same files the full build writes (a test compares them).
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

from ml.models.base import BaseModelSpec, local_path


def tokenizer_dir(spec: BaseModelSpec, data_dir: Path) -> Path:
    kind, _, ref = spec.source.partition(":")
    if kind != "builtin":
        return local_path(spec, data_dir)
    full = data_dir.resolve() / "base_models" / spec.id
    if (full / "config.json").exists():
        return full
    dst = full.with_name(f"{spec.id}.tokenizer")
    if not (dst / "tokenizer.json").exists():
        build_tokenizer(ref, dst)
    return dst


def build_tokenizer(ref: str, dst: Path) -> None:
    """The tokenizer of builtin model `ref`, saved into `dst` atomically (a temp dir, then rename)."""
    from transformers import PreTrainedTokenizerFast  # no torch: tokenizer classes only

    from ml.models import builtin

    if ref != "tiny-causal-lm":
        raise ValueError(f"unknown builtin model {ref!r}")
    # The tokenizer arguments of `builtin._build_tiny_causal_lm`.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=builtin._train_tokenizer(), bos_token=builtin.BOS, eos_token=builtin.EOS,
        pad_token=builtin.PAD, chat_template=builtin.CHAT_TEMPLATE, padding_side="left", model_max_length=512)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tokenizer.save_pretrained(str(tmp))
        os.rename(tmp, dst)
    except OSError as e:  # another process finished first: keep theirs
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not (dst / "tokenizer.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
