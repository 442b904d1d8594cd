"""Batched incremental decoding with a KV cache, at the iteration level: a `RunningBatch` takes new
rows between decode steps (they are prefilled together, then join) and lets finished or cancelled
rows leave at once. Rows are left-padded with explicit position ids, so a row's tokens come out the
same whether it runs alone, joins a running batch or outlives its neighbours. Each row keeps its own
sampling params, stop strings, token budget and seeded generator."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from ml.inference.sampling import RowDecoder, make_generator, sample_token


@dataclass
class GenRow:
    ids: list[int]
    decoder: RowDecoder
    adapter: str | None = None  # peft adapter name (mixed LoRA batches)
    prefix: torch.Tensor | None = None  # prompt tuning: virtual-token embeddings [P, H]
    cancelled: Callable[[], bool] = lambda: False
    owner: Any = None  # what the caller tracks the row by (the engine: its request item)


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


@dataclass
class Target:
    """What a batch's forwards run on (the engine resolves it afresh before every step)."""

    model: torch.nn.Module
    embed_model: PreTrainedModel | None = None  # prompt tuning: the prefill feeds [prefix][tokens] embeddings
    mixed: bool = False  # mixed LoRA: every row names its adapter (`adapter_names`)
    extra: dict[str, Any] = field(default_factory=dict)

    def kwargs(self, rows: list[GenRow]) -> dict[str, Any]:
        if not self.mixed:
            return self.extra
        return {**self.extra, "adapter_names": [r.adapter or "__base__" for r in rows]}


class RunningBatch:
    """Rows decoding together, joined and left between steps. Between steps the KV cache holds every
    row's tokens but its last sampled one (`pending`), left-padded to a common width that `mask`
    marks; `pos` is each row's next position. One thread at a time (the engine's model thread)."""

    def __init__(self, pad_id: int, device: torch.device) -> None:
        self.pad_id = pad_id
        self.device = device
        self.rows: list[GenRow] = []
        self.gens: list[torch.Generator] = []
        self.cache: Cache | None = None
        self.mask = self.pos = self.pending = torch.zeros(0, dtype=torch.long, device=device)

    def clear(self) -> None:
        """Drop every row and the cache (its memory goes at once)."""
        self.rows, self.gens, self.cache = [], [], None
        self.mask = self.pos = self.pending = torch.zeros(0, dtype=torch.long, device=self.device)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def joinable(self) -> bool:
        """Rows can join (and padding can be trimmed) only on plain growing caches: a sliding-window
        layer keeps no full history to pad or trim."""
        return self.cache is None or all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def join(self, target: Target, rows: list[GenRow]) -> None:
        """Prefill `rows` and sample their first token (it streams out at once); they take part in
        the next step. Shorter prompts go first, and only prompts of similar length are prefilled
        together: padding a short prompt to a long one costs compute (and first-token latency) for
        nothing. Raises if the batch is not `joinable`."""
        rows = [r for r in rows if not _cancel_if_asked(r)]
        if rows and not self.joinable:
            raise RuntimeError("rows cannot join a batch on a sliding-window cache")
        for group in _prefill_groups(rows):
            self._prefill(target, group)

    def _prefill(self, target: Target, rows: list[GenRow]) -> None:
        gens = [make_generator(r.decoder.params.seed, self.device) for r in rows]
        if target.embed_model is not None:
            embeds, mask = prefixed_embeds(target.embed_model, [(r.ids, r.prefix) for r in rows], self.device)
            first: dict[str, Any] = {"inputs_embeds": embeds}
        else:
            ids, mask = left_pad([r.ids for r in rows], self.pad_id, self.device)
            first = {"input_ids": ids}
        pos = positions(mask)
        out = target.model(**first, attention_mask=mask, position_ids=pos, use_cache=True,
                           **_last_logits_only(target.model), **target.kwargs(rows))
        tokens = self._sample(out.logits[:, -1, :], rows, gens)
        self._merge(rows, gens, out.cache, mask, pos[:, -1] + 1, tokens)
        self._leave()

    def step(self, target: Target) -> None:
        """One decode step for every row: feeds the pending tokens, samples the next ones; rows that
        finish (or were cancelled) leave at once."""
        for row in self.rows:
            _cancel_if_asked(row)
        self._leave()
        if not self.rows:
            return
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        out = target.model(input_ids=self.pending[:, None], attention_mask=self.mask,
                           position_ids=self.pos[:, None], cache=self.cache, use_cache=True,
                           **target.kwargs(self.rows))
        self.cache = out.cache
        self.pos = self.pos + 1
        self.pending = self._sample(out.logits[:, -1, :], self.rows, self.gens)
        self._leave()

    def _sample(self, logits: torch.Tensor, rows: list[GenRow], gens: list[torch.Generator]) -> torch.Tensor:
        logits = logits.float()
        greedy = logits.argmax(-1).tolist() if any(r.decoder.params.temperature <= 0 for r in rows) else []
        chosen = []
        for i, row in enumerate(rows):
            params = row.decoder.params
            token = greedy[i] if params.temperature <= 0 else sample_token(logits[i], params, gens[i])
            row.decoder.push(token)
            chosen.append(token)
        return torch.tensor(chosen, device=self.device)

    def _merge(self, rows: list[GenRow], gens: list[torch.Generator], cache: Cache, mask: torch.Tensor,
               pos: torch.Tensor, pending: torch.Tensor) -> None:
        if self.cache is None or not self.rows:
            self.rows, self.gens, self.cache, self.mask, self.pos, self.pending = rows, gens, cache, mask, pos, pending
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            for old, new in zip(_layers(self.cache), _layers(cache), strict=True):
                if old.is_initialized and new.is_initialized:
                    old.keys = torch.cat([_pad_left(old.keys, width, -2), _pad_left(new.keys, width, -2)])
                    old.values = torch.cat([_pad_left(old.values, width, -2), _pad_left(new.values, width, -2)])
            self.mask = torch.cat([_pad_left(self.mask, width, -1), _pad_left(mask, width, -1)])
            self.pos = torch.cat([self.pos, pos])
            self.pending = torch.cat([self.pending, pending])
            self.rows = self.rows + rows
            self.gens = self.gens + gens
        order = sorted(range(len(self.rows)), key=lambda i: self.rows[i].adapter or "")
        if order != list(range(len(self.rows))):
            self._select(order)  # one adapter's rows contiguous: slices in mixed LoRA forwards

    def _leave(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if not r.decoder.done]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.clear()
            return
        self._select(keep)
        self._trim()

    def _select(self, indices: list[int]) -> None:
        index = torch.tensor(indices, device=self.device)
        assert self.cache is not None
        for layer in _layers(self.cache):
            layer.batch_select_indices(index)
        self.mask, self.pos, self.pending = self.mask[index], self.pos[index], self.pending[index]
        self.rows = [self.rows[i] for i in indices]
        self.gens = [self.gens[i] for i in indices]

    def _trim(self) -> None:
        """Drop leading columns that are padding in every row (left behind by a longer row that left)."""
        if not self.joinable or self.cache is None:
            return
        lead = int((self.mask.sum(0) > 0).int().argmax())
        if lead == 0:
            return
        for layer in _layers(self.cache):
            if layer.is_initialized and layer.keys is not None and layer.keys.numel():
                layer.keys = layer.keys[:, :, lead:]
                layer.values = layer.values[:, :, lead:]
        self.mask = self.mask[:, lead:]


def generate(model: torch.nn.Module, rows: list[GenRow], *, pad_id: int, device: torch.device,
             extra: dict[str, Any] | None = None, embed_model: PreTrainedModel | None = None) -> None:
    """Runs `rows` as one batch until every row is done; results flow out through the decoders' sinks.
    `embed_model` set: the prefill feeds embeddings (prompt tuning) instead of ids. `extra`: constant
    forward kwargs (per-row adapters go in `GenRow.adapter` with `Target.mixed`)."""
    batch = RunningBatch(pad_id, device)
    target = Target(model, embed_model, extra=extra or {})
    batch.join(target, rows)
    while batch:
        batch.step(target)


def _prefill_groups(rows: list[GenRow], max_padding: float = 0.25) -> list[list[GenRow]]:
    """Rows by prompt length, cut where padding would exceed `max_padding` of a group's tokens."""
    size = lambda r: len(r.ids) + (0 if r.prefix is None else r.prefix.shape[0])  # noqa: E731
    groups: list[list[GenRow]] = []
    for row in sorted(rows, key=size):
        group = groups[-1] if groups else []
        if group and size(row) * (len(group) + 1) > (1 + max_padding) * (sum(map(size, group)) + size(row)):
            group = []
        if not group:
            groups.append(group)
        group.append(row)
    return groups


def _cancel_if_asked(row: GenRow) -> bool:
    if row.cancelled():
        row.decoder.cancel()
    return row.decoder.done


def _layers(cache: Cache) -> list[Any]:
    return list(cache.layers)


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


_KEEPS_LAST: dict[type, bool] = {}


def _last_logits_only(model: torch.nn.Module) -> dict[str, Any]:
    """`logits_to_keep=1` where the model takes it: a prefill needs no logits over the whole prompt."""
    get_base = getattr(model, "get_base_model", None)
    kind = type(get_base() if callable(get_base) else model)
    if kind not in _KEEPS_LAST:
        _KEEPS_LAST[kind] = "logits_to_keep" in inspect.signature(kind.forward).parameters
    return {"logits_to_keep": 1} if _KEEPS_LAST[kind] else {}
