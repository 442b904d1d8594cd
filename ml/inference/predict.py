"""One padded forward for a batch of prediction rows, then per-task post-processing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from ml.inference.generation import left_pad, positions, prefixed_embeds
from ml.inference.loading import ModelMeta


@dataclass
class PredRow:
    ids: list[int]
    meta: ModelMeta
    adapter: str | None = None
    prefix: torch.Tensor | None = None
    top_k: int = 5


def right_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    return ids, mask


def forward(model: torch.nn.Module, rows: list[PredRow], *, decoder: bool, device: torch.device,
            extra: dict[str, Any] | None = None, embed_model: PreTrainedModel | None = None) -> torch.Tensor:
    """Logits for the batch: [B, C] for heads, [B, T, V] for masked LM (aligned with `ids`).
    Decoders are left-padded with explicit positions; encoders right-padded."""
    pad_id = rows[0].meta.pad_id
    kwargs: dict[str, Any] = dict(extra or {})
    if embed_model is not None:
        seqs = [(r.ids, r.prefix) for r in rows]
        kwargs["inputs_embeds"], mask = prefixed_embeds(embed_model, seqs, device, right=not decoder)
    elif decoder:
        kwargs["input_ids"], mask = left_pad([r.ids for r in rows], pad_id, device)
    else:
        kwargs["input_ids"], mask = right_pad([r.ids for r in rows], pad_id, device)
    if decoder:
        kwargs["position_ids"] = positions(mask)
    logits = model(attention_mask=mask, **kwargs).logits.float()
    if logits.dim() == 3 and embed_model is not None and rows[0].prefix is not None:
        logits = logits[:, rows[0].prefix.shape[0]:]  # drop the virtual tokens (right-padded encoders)
    return logits.cpu()


def postprocess(task: str, row: PredRow, logits: torch.Tensor) -> dict[str, Any]:
    if task == "regression":
        return {"value": float(logits.reshape(-1)[0])}
    if task == "masked_lm":
        return {"fills": _fills(row, logits)}
    return _classify(row, logits)


def _classify(row: PredRow, logits: torch.Tensor) -> dict[str, Any]:
    info = row.meta.info
    multi = info.problem_type == "multi_label_classification"
    probs = torch.sigmoid(logits) if multi else torch.softmax(logits, dim=-1)
    names = info.label_names or [f"LABEL_{i}" for i in range(probs.shape[-1])]
    best = int(torch.argmax(probs).item())
    return {"label": names[best], "score": float(probs[best]),
            "scores": {names[i]: float(p) for i, p in enumerate(probs.tolist())}}


def _fills(row: PredRow, logits: torch.Tensor) -> list[list[dict[str, Any]]]:
    """For each mask token (in order): the top-k candidates with their probabilities."""
    tok = row.meta.tok
    out = []
    for pos in [i for i, t in enumerate(row.ids) if t == row.meta.mask_id]:
        probs = torch.softmax(logits[pos], dim=-1)
        top = torch.topk(probs, k=min(row.top_k, probs.shape[-1]))
        out.append([{"token": int(t), "token_str": tok.token_str(int(t)), "score": float(p)}
                    for p, t in zip(top.values.tolist(), top.indices.tolist(), strict=True)])
    return out
