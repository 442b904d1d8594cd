"""Which tokens of a chat conversation are the assistant's, with any chat template. Torch-free.

`apply_chat_template(..., return_assistant_tokens_mask=True)` only works for templates with
`{% generation %}` markers, and most real templates (SmolLM2's, Llama's, Qwen's) have none. Instead
the conversation is rendered prefix by prefix: assistant turn i spans from the end of
`render(messages[:i], add_generation_prompt=True)` (so the role header is not learned) to the end of
`render(messages[:i + 1])`, less trailing whitespace (the newline a template puts after its
end-of-turn token is never generated). The span keeps the end-of-turn token, so the model learns to
stop. Character spans become token masks the way transformers maps `{% generation %}` spans: every
token overlapping a span is in. For a template with markers this gives exactly the marked mask.

Turns with `"weight": 0` are left out. Where the generation prompt is not how the template renders
a turn's header, the span starts at the end of the previous turn instead. A template that does not
render a conversation's prefixes as prefixes of the whole (one that rewrites earlier turns once
later ones exist) is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ml.errors import TrainingDataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Span = tuple[int, int]  # [start, end) character offsets in the rendered conversation


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]]
) -> tuple[list[int], list[int]]:
    """(token ids of the rendered conversation, 1/0 per token: part of an assistant turn to learn)."""
    if not tokenizer.chat_template:
        raise TrainingDataError(
            "this base model's tokenizer has no chat template; use prompt/completion or text data"
        )
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans = char_spans(tokenizer, messages, text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), token_mask(enc["offset_mapping"], spans)


def char_spans(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]], text: str) -> list[Span]:
    """Character spans of the learned assistant turns in `text`, the whole conversation rendered."""
    spans: list[Span] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or message.get("weight", 1) == 0:
            continue
        end = _prefix_end(text, _render(tokenizer, messages[: i + 1], add_generation_prompt=False), i)
        start = _turn_start(tokenizer, messages, i, text, end)
        while end > start and text[end - 1].isspace():
            end -= 1
        if end > start:
            spans.append((start, end))
    return spans


def token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[int]:
    """1 for every token overlapping a span (spans and offsets both in order), as transformers does."""
    mask = [0] * len(offsets)
    k = 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[t] = 1
    return mask


def _turn_start(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]], i: int, text: str, end: int
) -> int:
    if i == 0:  # nothing to render before it: start at the content (the header stays out)
        found = text.find(str(messages[0].get("content") or ""), 0, end)
        return max(found, 0)
    prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
    if text.startswith(prompt):
        return min(len(prompt), end)
    # a generation prompt unlike the rendered turn header (e.g. an empty "think" block): learn the header too
    return _prefix_end(text, _render(tokenizer, messages[:i], add_generation_prompt=False), i - 1)


def _prefix_end(text: str, prefix: str, i: int) -> int:
    if not text.startswith(prefix):
        raise TrainingDataError(
            f"the chat template renders message {i} differently once later messages follow it, so the "
            "assistant turns cannot be located; use prompt/completion data with this model"
        )
    return len(prefix)


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
    out = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    return str(out)
