"""Batched incremental decoding with a KV cache. Rows are left-padded with explicit position
ids, so a row's tokens come out the same whether it runs alone or in a batch. Each row keeps its
own sampling params, stop strings and token budget; the batch ends when every row is done."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from ml.inference.sampling import RowDecoder, make_generator, sample_token


@dataclass
class GenRow:
    ids: list[int]
    decoder: RowDecoder
    adapter: str | None = None  # peft adapter name (mixed LoRA batches)
    prefix: torch.Tensor | None = None  # prompt tuning: virtual-token embeddings [P, H]
    cancelled: Callable[[], bool] = lambda: False


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


Prefixed = tuple[list[int], torch.Tensor | None]


def prefixed_embeds(model: PreTrainedModel, seqs: list[Prefixed], device: torch.device,
                    right: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[virtual tokens][tokens] per row, padded with zero vectors (left, or right for encoders)."""
    table = model.get_input_embeddings()
    parts = []
    for ids, prefix in seqs:
        tokens = table(torch.tensor(ids, device=device))
        parts.append(tokens if prefix is None else torch.cat([prefix.to(tokens.dtype), tokens]))
    width = max(p.shape[0] for p in parts)
    embeds = torch.zeros(len(parts), width, parts[0].shape[1], dtype=parts[0].dtype, device=device)
    mask = torch.zeros(len(parts), width, dtype=torch.long, device=device)
    for i, p in enumerate(parts):
        sl = slice(0, p.shape[0]) if right else slice(width - p.shape[0], width)
        embeds[i, sl] = p
        mask[i, sl] = 1
    return embeds, mask


def generate(model: torch.nn.Module, rows: list[GenRow], *, pad_id: int, device: torch.device,
             extra: dict[str, Any] | None = None, embed_model: PreTrainedModel | None = None) -> None:
    """Runs until every row's decoder is done; results flow out through the decoders' sinks.
    `embed_model` set: the first step feeds embeddings (prompt tuning) instead of ids."""
    extra = extra or {}
    gens = [make_generator(r.decoder.params.seed, device) for r in rows]
    if embed_model is not None:
        embeds, mask = prefixed_embeds(embed_model, [(r.ids, r.prefix) for r in rows], device)
        first: dict[str, Any] = {"inputs_embeds": embeds}
    else:
        ids, mask = left_pad([r.ids for r in rows], pad_id, device)
        first = {"input_ids": ids}
    pos = positions(mask)
    out = model(**first, attention_mask=mask, position_ids=pos, use_cache=True, **extra)
    budget = max(r.decoder.params.max_new_tokens for r in rows)
    for _ in range(budget):
        nxt = _step(out.logits[:, -1, :].float(), rows, gens, pad_id)
        if all(r.decoder.done for r in rows):
            return
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt.to(device)[:, None], attention_mask=mask, position_ids=pos,
                    past_key_values=out.past_key_values, use_cache=True, **extra)
    for r in rows:  # budget exhausted without a finish (cannot happen unless max_new_tokens < 1)
        r.decoder.cancel()


def _step(logits: torch.Tensor, rows: list[GenRow], gens: list[torch.Generator], pad_id: int) -> torch.Tensor:
    chosen = []
    for i, row in enumerate(rows):
        if row.cancelled():
            row.decoder.cancel()
        if row.decoder.done:
            chosen.append(pad_id)
            continue
        token = sample_token(logits[i], row.decoder.params, gens[i])
        row.decoder.push(token)
        chosen.append(token)
    return torch.tensor(chosen)
