"""`Tok.encode` calls the Rust tokenizer under a fast one directly (the serving hot path): the same ids as
the transformers wrapper, for the real encoder and chat model, on text that is long, odd or full of
special-token lookalikes, also after the same tokenizer was used with truncation on."""

from __future__ import annotations

import pytest

from app.models_registry.catalog import local_base
from ml.inference.loading import Tok
from ml.modeling import load_tokenizer

TEXTS = ["The delivery was late and the package was damaged.", "", "  spaces\tand\nnewlines  ",
         "Ünïcödé — «quotes» 日本語 🙂", "[CLS] [SEP] [MASK] <|im_start|>user<|im_end|> </s>",
         "word " * 700]


@pytest.mark.parametrize("base", ["minilm-l6", "smollm2-135m"])
def test_fast_encode_gives_the_wrappers_ids(base: str) -> None:
    tokenizer = load_tokenizer(local_base(base).path)
    tok = Tok(tokenizer)
    assert tok._backend is not None
    tokenizer("warm " * 600, truncation=True, max_length=16)  # leaves truncation set on the backend
    for text in TEXTS:
        assert tok.encode(text) == list(tokenizer(text, add_special_tokens=True)["input_ids"]), text
    assert len(tok.encode(TEXTS[-1])) > 700  # never truncated
