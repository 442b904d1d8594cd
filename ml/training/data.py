"""Datasets for the recipes: read normalized records, tokenize per task, plan batches, collate.

Batches are length-grouped (seeded shuffle, then sorted within large chunks) and padded only to the
longest sequence in the batch. Everything random here is a pure function of (seed, epoch, batch
index), so a resumed run sees exactly the batches (and MLM masks) of an uninterrupted one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ml.config import Hooks, Task
from ml.data.cleaning import CleaningOptions, clean_records
from ml.data.formats import iter_records

IGNORE = -100
GROUP_CHUNK = 50  # batches per length-sorted chunk
MLM_PROB = 0.15


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | None = None  # causal LM: per-token targets (IGNORE = no loss)
    target: float | None = None  # classification index / regression value


@dataclass
class Encoded:
    examples: list[Example]
    skipped: int = 0  # nothing left to learn from after truncation


def read_records(path: Path, kind: str, cleaning: dict[str, Any] | None = None, hooks: Hooks | None = None,
                 where: str = "training") -> list[dict[str, Any]]:
    """The file's normalized records, cleaned with the job's `cleaning` options when it has any (the
    report goes out as an event). A validation file is only PII-scrubbed: its rows are what the
    model is measured on, and it must see the same placeholders as the training data."""
    records = iter_records(path, kind)
    options = CleaningOptions.model_validate(cleaning) if cleaning else None
    if options is not None and where != "training":
        scrub_only = {"drop_empty": False, "scrub_pii": True}
        options = CleaningOptions.model_validate(scrub_only) if options.scrub_pii else None
    if options is None:
        return list(records)
    kept, report = clean_records(records, options)
    if hooks is not None:
        hooks.message(f"Cleaned the {where} data: {report.summary()}",
                      data={"cleaning": report.as_dict(), "file": where})
    return kept


def label_names_from(records: list[dict[str, Any]]) -> list[str]:
    names = sorted({str(r["label"]) for r in records if "label" in r})
    if len(names) < 2:
        raise ValueError(
            f"classification needs at least 2 distinct labels in the training data, found {names}"
        )
    return names


def check_labels(records: list[dict[str, Any]], label_names: list[str], where: str) -> None:
    unknown = sorted({str(r["label"]) for r in records} - set(label_names))
    if unknown:
        raise ValueError(
            f"the {where} data has labels that are not in the training data: {unknown[:10]}; "
            f"known labels: {label_names[:20]}"
        )


# --- tokenization -----------------------------------------------------------------------------


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
    if not tok.chat_template:
        raise ValueError(
            "this base model's tokenizer has no chat template; use prompt/completion or text data"
        )
    out: Any = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
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


# --- batch planning ---------------------------------------------------------------------------


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Seeded per-epoch shuffle, length-grouped: similar lengths share a batch, batch order random."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * GROUP_CHUNK
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: -lengths[i])
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def eval_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[j : j + batch_size] for j in range(0, len(order), batch_size)]


# --- collation --------------------------------------------------------------------------------


class Collator:
    """Pads to the batch's longest sequence; builds labels/targets; masks tokens for MLM."""

    def __init__(self, task: Task, tok: PreTrainedTokenizerBase, pad_left: bool, seed: int) -> None:
        self.task, self.pad_left, self.seed = task, pad_left, seed
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.mask_id = tok.mask_token_id
        self.vocab_size = len(tok)
        self.special_ids = torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)
        if task is Task.masked_lm and self.mask_id is None:
            raise ValueError("masked_lm needs a tokenizer with a mask token")

    def __call__(self, examples: list[Example], key: tuple[int, int]) -> dict[str, torch.Tensor]:
        """`key` = (epoch, batch index): seeds the MLM masking of this batch."""
        input_ids = self._pad([e.input_ids for e in examples], self.pad_id)
        batch = {
            "input_ids": input_ids,
            "attention_mask": self._pad([[1] * len(e.input_ids) for e in examples], 0),
        }
        if self.task is Task.causal_lm:
            batch["labels"] = self._pad([e.labels or [] for e in examples], IGNORE)
            batch["n_targets"] = (batch["labels"][:, 1:] != IGNORE).sum()
        elif self.task is Task.masked_lm:
            batch["input_ids"], batch["labels"] = self._mask(input_ids, batch["attention_mask"], key)
            batch["n_targets"] = (batch["labels"] != IGNORE).sum()
        else:
            dtype = torch.long if self.task is Task.classification else torch.float32
            batch["targets"] = torch.tensor([e.target for e in examples], dtype=dtype)
            batch["n_targets"] = torch.tensor(len(examples))
        batch["n_tokens"] = batch["attention_mask"].sum()
        return batch

    def _pad(self, seqs: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        rows = [
            [value] * (width - len(s)) + s if self.pad_left else s + [value] * (width - len(s)) for s in seqs
        ]
        return torch.tensor(rows, dtype=torch.long)

    def _mask(
        self, ids: torch.Tensor, attn: torch.Tensor, key: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT-style: 15% of real tokens are targets; of those 80% -> [MASK], 10% random, 10% kept."""
        gen = torch.Generator().manual_seed(hash_seed(self.seed, *key))
        candidates = (attn == 1) & ~torch.isin(ids, self.special_ids)
        chosen = (torch.rand(ids.shape, generator=gen) < MLM_PROB) & candidates
        chosen |= _one_per_row(candidates, chosen, gen)
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
        roll = torch.rand(ids.shape, generator=gen)
        random_ids = torch.randint(self.vocab_size, ids.shape, generator=gen)
        out = torch.where(chosen & (roll < 0.8), torch.full_like(ids, self.mask_id), ids)
        out = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, out)
        return out, labels


def _one_per_row(candidates: torch.Tensor, chosen: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Rows where nothing was chosen get one random candidate position (short texts still teach)."""
    extra = torch.zeros_like(chosen)
    scores = torch.rand(candidates.shape, generator=gen).masked_fill(~candidates, -1.0)
    for row in range(chosen.shape[0]):
        if not chosen[row].any() and candidates[row].any():
            extra[row, int(scores[row].argmax())] = True
    return extra


def hash_seed(*parts: int) -> int:
    return random.Random(":".join(map(str, parts))).getrandbits(63)
