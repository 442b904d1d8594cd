"""Assistant spans by prefix rendering: the `{% generation %}` mask where a template has markers, and
the same mask for SmolLM2's template, which has none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from app.models_registry.catalog import base_model_path, get_spec
from ml.config import Task
from ml.data.chat import assistant_spans, token_mask
from ml.data.tokens import IGNORE, encode
from ml.errors import TrainingDataError

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "Blue."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Skip this.", "weight": 0},
        {"role": "user", "content": "Color of grass?"},
        {"role": "assistant", "content": "Green.", "weight": 1},
        {"role": "user", "content": "And snow?"},
        {"role": "assistant", "content": "White, mostly.\n\nSometimes grey. "},
    ],
    [
        {"role": "developer", "content": "Answer in JSON."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": '{"answer": 4}'},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "Done", "weight": 0},
    ],
    [{"role": "assistant", "content": "Hello, how can I help?"}, {"role": "user", "content": "Thanks"}],
]
# SmolLM2's template with `{% generation %}` around what a turn should learn: the reference mask.
SMOL_MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['role'] == 'assistant' and message.get('weight', 1) != 0 %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tiny() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(base_model_path(get_spec("tiny-lm")))


@pytest.fixture(scope="module")
def smol() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(base_model_path(get_spec("smollm2-135m")))


def marker_mask(tok: PreTrainedTokenizerBase, msgs: list[dict[str, Any]], template: str | None = None
                ) -> tuple[list[int], list[int]]:
    out: Any = tok.apply_chat_template(msgs, chat_template=template, return_dict=True,
                                       return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def learned(tok: PreTrainedTokenizerBase, msgs: list[dict[str, Any]]) -> str:
    ids, mask = assistant_spans(tok, msgs)
    return tok.decode([i for i, m in zip(ids, mask, strict=True) if m])


@pytest.mark.parametrize("n", range(len(CONVERSATIONS)))
def test_matches_the_generation_markers_of_tiny_lm(tiny: PreTrainedTokenizerBase, n: int) -> None:
    msgs = CONVERSATIONS[n]
    if n == 3:  # an assistant turn first: the content is found, the marked mask says the same
        assert learned(tiny, msgs) == "Hello, how can I help?<|end|>"
    assert assistant_spans(tiny, msgs) == marker_mask(tiny, msgs)


def test_smollm2_template_has_no_markers(smol: PreTrainedTokenizerBase) -> None:
    assert "{% generation %}" not in str(smol.chat_template)
    assert smol.apply_chat_template(CONVERSATIONS[0], tokenize=False) == smol.apply_chat_template(
        CONVERSATIONS[0], chat_template=SMOL_MARKED, tokenize=False)


@pytest.mark.parametrize("n", range(len(CONVERSATIONS)))
def test_smollm2_matches_a_marked_copy_of_its_template(smol: PreTrainedTokenizerBase, n: int) -> None:
    assert assistant_spans(smol, CONVERSATIONS[n]) == marker_mask(smol, CONVERSATIONS[n], SMOL_MARKED)


def test_smollm2_learns_answers_and_their_end_only(smol: PreTrainedTokenizerBase) -> None:
    assert learned(smol, CONVERSATIONS[0]) == "Blue.<|im_end|>"
    assert learned(smol, CONVERSATIONS[1]) == (
        "Green.<|im_end|>White, mostly.\n\nSometimes grey. <|im_end|>")  # not "Skip this.", nor headers
    assert learned(smol, CONVERSATIONS[2]) == '{"answer": 4}<|im_end|>'


def test_encode_trains_chat_on_smollm2(smol: PreTrainedTokenizerBase) -> None:
    records = [{"messages": m} for m in CONVERSATIONS]
    encoded = encode(records, Task.causal_lm, smol, 512, None, decoder=True)
    assert len(encoded.examples) == 4 and encoded.skipped == 0
    labels = encoded.examples[0].labels or []
    assert smol.decode([t for t in labels if t != IGNORE]) == "Blue.<|im_end|>"


def test_a_template_that_rewrites_history_is_refused(tiny: PreTrainedTokenizerBase) -> None:
    # drops earlier assistant turns once a later one exists (as reasoning templates do with thoughts)
    template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}")
    msgs = CONVERSATIONS[1]
    with pytest.raises(TrainingDataError, match="differently once later messages"):
        assistant_spans(_with_template(tiny, template), msgs)


def test_a_generation_prompt_unlike_the_header_learns_the_header(tiny: PreTrainedTokenizerBase) -> None:
    template = ("{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + '\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '[assistant] <think></think>' }}{% endif %}")
    text = learned(_with_template(tiny, template), CONVERSATIONS[0])
    assert text.replace(" ", "") == "[assistant]Blue."


def test_no_chat_template(tiny: PreTrainedTokenizerBase) -> None:
    with pytest.raises(TrainingDataError, match="no chat template"):
        assistant_spans(_with_template(tiny, None), CONVERSATIONS[0])


def test_token_mask_marks_every_overlapping_token() -> None:
    offsets = [(0, 2), (2, 5), (5, 6), (6, 9), (9, 12)]
    assert token_mask(offsets, [(3, 6), (9, 10)]) == [0, 1, 1, 0, 1]
    assert token_mask(offsets, []) == [0, 0, 0, 0, 0]


def _with_template(tok: PreTrainedTokenizerBase, template: str | None) -> PreTrainedTokenizerBase:
    copy: Any = AutoTokenizer.from_pretrained(Path(tok.name_or_path))
    copy.chat_template = template
    return copy
