"""Datasets for the recipes: read normalized records, tokenize per task (`ml.data.tokens`, re-exported
here), plan batches, collate.

Batches are length-grouped (seeded shuffle, then sorted within large chunks) and padded only to the
longest sequence in the batch. Everything random here is a pure function of (seed, epoch, batch
index), so a resumed run sees exactly the batches (and MLM masks) of an uninterrupted one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ml.config import Hooks, Task
from ml.data.cleaning import CleaningOptions, clean_records
from ml.data.formats import iter_records
from ml.data.tokens import IGNORE, Encoded, Example, Pair, encode, encode_pairs, token_lengths
from ml.errors import InputError, TrainingDataError

__all__ = [  # the tokenization names are re-exported: the recipe reads everything as `D.`
    "IGNORE", "Collator", "Encoded", "Example", "Pair", "check_labels", "encode", "encode_pairs", "epoch_batches",
    "eval_batches", "hash_seed", "label_names_from", "read_records", "token_lengths",
]

GROUP_CHUNK = 50  # batches per length-sorted chunk
MLM_PROB = 0.15


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
        raise TrainingDataError(
            f"classification needs at least 2 distinct labels in the training data, found {names}"
        )
    return names


def check_labels(records: list[dict[str, Any]], label_names: list[str], where: str) -> None:
    unknown = sorted({str(r["label"]) for r in records} - set(label_names))
    if unknown:
        raise TrainingDataError(
            f"the {where} data has labels that are not in the training data: {unknown[:10]}; "
            f"known labels: {label_names[:20]}"
        )


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
            raise InputError("masked_lm needs a tokenizer with a mask token")

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
