"""The locally built tiny causal LM: deterministic, atomic, a chat template with assistant masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.models_registry.catalog import base_model_path, get_spec
from ml.models import builtin
from ml.models.assets import make_corpus


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return base_model_path(get_spec("tiny-lm"))


def test_corpus_is_reproducible() -> None:
    text = builtin.CORPUS.read_text(encoding="utf-8")
    assert text == make_corpus.generate()
    assert 50_000 <= len(text.encode()) <= 200_000


def test_build_is_deterministic_and_atomic(tmp_path: Path, tiny_dir: Path) -> None:
    dst = tmp_path / "again"
    builtin.build("tiny-causal-lm", dst)
    names = sorted(p.name for p in dst.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(names)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    for name in names:
        assert (dst / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    builtin.build("tiny-causal-lm", dst)  # building over a finished dir keeps it
    with pytest.raises(ValueError, match="unknown builtin"):
        builtin.build("nope", tmp_path / "x")


def test_tokenizer_and_model(tiny_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert 1000 <= len(tok) <= 2100
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|eos|>" and tok.padding_side == "left"
    ids = tok("The cat was sitting near the park.")["input_ids"]
    assert (
        ids[0] == tok.bos_token_id
        and tok.decode(ids, skip_special_tokens=True) == "The cat was sitting near the park."
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.config.pad_token_id == tok.pad_token_id and model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\ntiny-lm: vocab {len(tok)}, {n_params:,} parameters")


def test_chat_template_masks_assistant_turns(tiny_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    msgs: Any = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Skip this.", "weight": 0},
        {"role": "user", "content": "Color?"},
        {"role": "assistant", "content": "Blue."},
    ]
    out: Any = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    learned = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tok.decode(learned) == "Blue.<|end|>"
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
