"""Faster mixed-adapter LoRA batches.

peft's `adapter_names` path gathers each adapter's rows with an index list and scatters the
LoRA update back (`x[idx]`, `result[idx] += ...`) in every LoRA layer, a handful of small ops
per adapter per layer. The engine sorts a mixed batch by adapter, and this replacement then
- runs few adapters as contiguous slices (a view in, an in-place update out), and
- runs many adapters (of one rank) as one gathered batched matmul: each row picks its adapter's
  A and B from a stack (the "BGMV" trick), so the op count no longer grows with the adapters.
It is installed per module instance on the engine's own wrappers only (peft's class is left
alone), and anything unusual (LoRA variants such as DoRA, aLoRA offsets) defers to peft."""

from __future__ import annotations

from itertools import groupby
from types import MethodType
from typing import Any

import torch
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
from peft.tuners.lora.layer import Linear as LoraLinear

GATHER_FROM_RUNS = 3  # this many adapters in one layer -> the gathered path

Span = tuple[str, int, int]


def install(model: torch.nn.Module) -> None:
    """Idempotent: call again after loading an adapter (it may add LoRA layers)."""
    for module in model.modules():
        if type(module) is LoraLinear and "_mixed_batch_forward" not in module.__dict__:
            module.__dict__["_mixed_batch_forward"] = MethodType(_mixed_forward, module)


def clear(model: torch.nn.Module) -> None:
    """Drop cached weight stacks (they would keep an evicted adapter's weights alive)."""
    for module in model.modules():
        module.__dict__.pop("_tunehouse_stacks", None)


def runs(names: list[str]) -> list[Span]:
    """Contiguous runs of equal adapter names: (name, start, end)."""
    out, start = [], 0
    for name, group in groupby(names):
        size = sum(1 for _ in group)
        out.append((name, start, start + size))
        start += size
    return out


def _mixed_forward(self: Any, x: torch.Tensor, *args: Any, adapter_names: list[str],
                   **kwargs: Any) -> torch.Tensor:
    if self.training or any(n in self.lora_variant for n in set(adapter_names)) or any(
            kwargs.get(k) is not None for k in VARIANT_KWARG_KEYS):
        return type(self)._mixed_batch_forward(self, x, *args, adapter_names=adapter_names, **kwargs)
    for key in VARIANT_KWARG_KEYS:
        kwargs.pop(key, None)
    result = self.base_layer(x, *args, **kwargs)
    spans = [s for s in runs(adapter_names) if s[0] in self.lora_A]  # skips "__base__" and non-targets
    if len(spans) >= GATHER_FROM_RUNS and len({self.r[name] for name, _, _ in spans}) == 1:
        _gathered(self, x, result, spans, len(adapter_names))
    else:
        for name, start, end in spans:
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            sub = x[start:end].to(lora_a.weight.dtype)
            result[start:end] += (lora_b(lora_a(sub)) * self.scaling[name]).to(result.dtype)
    return result


def _gathered(self: Any, x: torch.Tensor, result: torch.Tensor, spans: list[Span], rows: int) -> None:
    a, b, scale = _stacks(self, [name for name, _, _ in spans])
    index = torch.full((rows,), len(spans), dtype=torch.long)  # the last stack entry is all zeros
    for i, (_, start, end) in enumerate(spans):
        index[start:end] = i
    index = index.to(a.device)
    flat = x.reshape(rows, -1, x.shape[-1]).to(a.dtype)
    hidden = torch.bmm(flat, a[index].transpose(1, 2))
    update = torch.bmm(hidden, b[index].transpose(1, 2)) * scale[index][:, None, None]
    result += update.reshape(result.shape).to(result.dtype)


def _stacks(self: Any, names: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stacked A [n+1, r, in], B [n+1, out, r] and scales, cached for the last set of adapters
    (decode steps of one batch reuse it); a zero entry serves rows without an adapter here."""
    weights = tuple((self.lora_A[n].weight, self.lora_B[n].weight) for n in names)
    cached = self.__dict__.get("_tunehouse_stacks")
    if cached is not None and len(cached[0]) == len(weights) and all(
            p is q and s is t for (p, s), (q, t) in zip(cached[0], weights, strict=True)):
        return cached[1]  # type: ignore[no-any-return]
    a = torch.stack([w for w, _ in weights] + [torch.zeros_like(weights[0][0])])
    b = torch.stack([w for _, w in weights] + [torch.zeros_like(weights[0][1])])
    scale = torch.tensor([self.scaling[n] for n in names] + [0.0], dtype=a.dtype, device=a.device)
    self.__dict__["_tunehouse_stacks"] = (weights, (a, b, scale))
    return a, b, scale
