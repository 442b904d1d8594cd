"""Tokenization of normalized records into training examples, per task: what the trainer trains on
(`encode`) and what the estimate counts (`token_lengths`), one code path for both.

Torch-free: the API counts tokens with it. `load_tokenizer_no_torch` loads the tokenizer the trainer's
`AutoTokenizer` loads, without `AutoTokenizer` itself (it reads the model config through modules that
import torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.config import Task
from ml.data.chat import assistant_spans

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100  # label of a token the loss skips
FALLBACK_CLASS = "TokenizersBackend"  # what AutoTokenizer falls back to: the tokenizer.json backend


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | None = None  # causal LM: per-token targets (IGNORE = no loss)
    target: float | None = None  # classification index / regression value


@dataclass
class Pair:
    """A preference pair: the prompt + preferred answer, the prompt + non-preferred answer; labels mark
    the answer's tokens only."""

    chosen: Example
    rejected: Example
    reference: tuple[float, float] | None = None  # the reference model's log-probs of both (`ml.training.dpo`)

    @property
    def length(self) -> int:
        """The padded width the pair needs (its rows are batched together)."""
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))


@dataclass
class Encoded:
    examples: list[Example]
    skipped: int = 0  # nothing left to learn from after truncation


# --- loading ----------------------------------------------------------------------------------


def _tokenizer_class_name(path: Path) -> str:
    cfg = path / "tokenizer_config.json"
    data = json.loads(cfg.read_text()) if cfg.is_file() else {}
    return str(data.get("tokenizer_class") or FALLBACK_CLASS)


def load_tokenizer_no_torch(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer class `tokenizer_config.json` names (transformers 5 dropped the `Fast` suffix),
    else the tokenizers backend; pad falls back to eos as in `ml.modeling.load_tokenizer`."""
    import transformers  # lazy top-level module: tokenizer classes load without torch

    name = _tokenizer_class_name(path)
    cls = getattr(transformers, name, None) or getattr(transformers, name.removesuffix("Fast"), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase)):
        cls = getattr(transformers, FALLBACK_CLASS)
    tok: PreTrainedTokenizerBase = cls.from_pretrained(path)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


# --- encoding ---------------------------------------------------------------------------------


def encode(
    records: list[dict[str, Any]],
    task: Task,
    tok: PreTrainedTokenizerBase,
    max_len: int,
    label_names: list[str] | None,
    decoder: bool,
) -> Encoded:
    if task is Task.causal_lm:
        return _encode_causal(records, tok, max_len)
    if task is Task.masked_lm:
        ids = _encode_texts([r["text"] for r in records], tok, max_len, append_eos=False)
        return Encoded([Example(i) for i in ids if len(i) > 2])
    texts = [r["text"] for r in records]
    ids = _encode_texts(texts, tok, max_len, append_eos=decoder)
    if task is Task.classification:
        index = {name: i for i, name in enumerate(label_names or [])}
        targets = [float(index[str(r["label"])]) for r in records]
    else:
        targets = [float(r["value"]) for r in records]
    return Encoded([Example(i, target=t) for i, t in zip(ids, targets, strict=True)])


def token_lengths(
    records: list[dict[str, Any]], task: Task, tok: PreTrainedTokenizerBase, max_len: int, decoder: bool
) -> list[int]:
    """Lengths of the training examples `encode` makes of these records (no labels needed): what a
    job trains on, for estimates."""
    if task is Task.causal_lm and records and "chosen" in records[0]:  # a DPO pair trains on both sequences
        return [len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in encode_pairs(records, tok, max_len)[0]]
    if task is Task.causal_lm:
        return [len(e.input_ids) for e in _encode_causal(records, tok, max_len).examples]
    mlm = task is Task.masked_lm
    ids = _encode_texts([r["text"] for r in records], tok, max_len, append_eos=decoder and not mlm)
    return [len(i) for i in ids if not mlm or len(i) > 2]


def _encode_texts(
    texts: list[str], tok: PreTrainedTokenizerBase, max_len: int, append_eos: bool
) -> list[list[int]]:
    room = max_len - 1 if append_eos else max_len
    out = tok(texts, truncation=True, max_length=room)["input_ids"]
    if append_eos and tok.eos_token_id is not None:  # decoders classify from the last token
        out = [[*ids, tok.eos_token_id] for ids in out]
    return out


def _encode_causal(records: list[dict[str, Any]], tok: PreTrainedTokenizerBase, max_len: int) -> Encoded:
    if not records:
        return Encoded([])
    first = records[0]
    if "messages" in first:
        pairs = [_encode_chat(r["messages"], tok) for r in records]
    elif "completion" in first:
        pairs = [_encode_prompt_completion(r, tok) for r in records]
    else:
        return Encoded(_encode_plain_text([r["text"] for r in records], tok, max_len))
    examples = [Example(ids[:max_len], labels[:max_len]) for ids, labels in pairs]
    kept = [e for e in examples if any(label != IGNORE for label in (e.labels or [])[1:])]
    return Encoded(kept, skipped=len(examples) - len(kept))


def _encode_chat(messages: list[dict[str, Any]], tok: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    ids, mask = assistant_spans(tok, messages)  # any chat template, not only `{% generation %}` ones
    return ids, [i if m else IGNORE for i, m in zip(ids, mask, strict=True)]


def _encode_prompt_completion(
    rec: dict[str, Any], tok: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    prompt = tok(rec["prompt"])["input_ids"]  # with the tokenizer's own special tokens (e.g. bos)
    completion = tok(rec["completion"], add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        completion = [*completion, tok.eos_token_id]
    return prompt + completion, [IGNORE] * len(prompt) + completion


def _encode_plain_text(texts: list[str], tok: PreTrainedTokenizerBase, max_len: int) -> list[Example]:
    """Loss on every token; long texts are split into max_len windows instead of being cut."""
    examples = []
    for ids in tok(texts)["input_ids"]:
        if tok.eos_token_id is not None:
            ids = [*ids, tok.eos_token_id]
        for start in range(0, len(ids), max_len):
            chunk = ids[start : start + max_len]
            if len(chunk) > 1:
                examples.append(Example(chunk, list(chunk)))
    return examples


def encode_pairs(records: list[dict[str, Any]], tok: PreTrainedTokenizerBase, max_len: int) -> tuple[list[Pair], int]:
    """Preference records (`ml.data.formats`) -> (pairs, pairs skipped: an answer with no token left)."""
    pairs: list[Pair] = []
    for rec in records:
        chosen = _encode_answer(rec["messages"], rec["chosen"], tok, max_len)
        rejected = _encode_answer(rec["messages"], rec["rejected"], tok, max_len)
        if chosen is not None and rejected is not None:
            pairs.append(Pair(chosen, rejected))
    return pairs, len(records) - len(pairs)


def _encode_answer(
    prompt: list[dict[str, Any]], answer: str, tok: PreTrainedTokenizerBase, max_len: int
) -> Example | None:
    """The prompt's turns (none learned) + the answer as the learned assistant turn, with the chat
    template (`ml.data.chat`). Too long: the prompt loses its oldest tokens first, then the answer its end."""
    turns = [{**m, "weight": 0} for m in prompt] + [{"role": "assistant", "content": answer, "weight": 1}]
    ids, mask = assistant_spans(tok, turns)
    first = mask.index(1) if 1 in mask else len(ids)
    cut = min(max(0, len(ids) - max_len), first)
    ids, mask = ids[cut:][:max_len], mask[cut:][:max_len]
    labels = [i if m else IGNORE for i, m in zip(ids, mask, strict=True)]
    return Example(ids, labels) if any(label != IGNORE for label in labels[1:]) else None
