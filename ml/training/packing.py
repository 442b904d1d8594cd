"""Padding-free packing for causal-LM SFT: several examples per row (the plan is `ml.data.packing`).

A packed row concatenates its examples; `position_ids` restart at 0 for each example, and there is no
2D attention mask. transformers 5 then detects the packed format from the position ids
(`masking_utils.find_packed_sequence_indices`) and builds a block-diagonal causal mask for eager and
sdpa attention (flash-attention kernels read the same position ids as varlen boundaries), so a token
attends only to earlier tokens of its own example. Each example's first label is dropped from the loss:
it would be "predicted" by the previous example's last token (an unpacked example never scores its
first token either). Rows shorter than the batch's longest are padded at the end with a separate
segment whose labels are all ignored. Loss per example is therefore that of the unpacked example.

On CPU a block-diagonal mask costs a full row x row attention matrix (and no causal skipping), which
cancels what packing saves. So CPU workers train packed rows with `PACKED_ATTENTION`: causal sdpa per
example, the same result without the masked-out blocks (packed tiny-lm steps ran ~1.4x faster than
with the mask); a batch that is not packed (evaluation) goes to plain sdpa with the usual mask. GPUs keep
transformers' mask (one fused kernel per layer rather than one launch per example).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from ml.data.tokens import IGNORE, Example

PACKED_KEY = "position_ids"  # a batch with this key is packed (`ml.modeling.forward_packed`)
PACKED_ATTENTION = "tunehouse_packed_sdpa"


class PackedCollator:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[list[Example]]) -> dict[str, torch.Tensor]:
        built = [self._row(row) for row in rows]
        width = max(len(ids) for ids, _, _ in built)
        ids = [r[0] + [self.pad_id] * (width - len(r[0])) for r in built]
        labels = [r[1] + [IGNORE] * (width - len(r[1])) for r in built]
        positions = [r[2] + list(range(width - len(r[2]))) for r in built]
        batch = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            PACKED_KEY: torch.tensor(positions, dtype=torch.long),
        }
        batch["n_targets"] = (batch["labels"][:, 1:] != IGNORE).sum()
        batch["n_tokens"] = torch.tensor(sum(len(r[0]) for r in built))
        return batch

    @staticmethod
    def _row(examples: list[Example]) -> tuple[list[int], list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for e in examples:
            ids += e.input_ids
            labels += [IGNORE, *(e.labels or [])[1:len(e.input_ids)]]
            positions += range(len(e.input_ids))
        return ids, labels, positions


# --- attention per example --------------------------------------------------------------------


def example_spans(positions: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Per row, the [start, end) of each example (each restart at position 0); None when no row holds
    more than one (an unpacked batch)."""
    starts = positions == 0
    if int(starts.sum()) <= positions.shape[0]:
        return None
    width = positions.shape[1]
    found: list[list[int]] = [[] for _ in range(positions.shape[0])]
    for row, col in starts.nonzero().tolist():
        found[row].append(col)
    return [list(zip(cols, [*cols[1:], width], strict=True)) for cols in found]


def packed_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature ((batch, heads, seq, dim) in, (batch, seq, heads, dim) out)."""
    positions = kwargs.get("position_ids")
    spans = example_spans(positions) if positions is not None and positions.dim() == 2 else None
    if spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    rows = [_row_attention(q, k, v, [e - s for s, e in row], dropout, scaling, gqa)
            for q, k, v, row in zip(query.unbind(0), key.unbind(0), value.unbind(0), spans, strict=True)]
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def _row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sizes: list[int], dropout: float,
                   scaling: float | None, gqa: bool) -> torch.Tensor:
    """(heads, seq, dim) of one row, attention inside each example. `split` (not slicing) so that backward
    concatenates the gradients instead of adding a zero-filled full-size tensor per example."""
    parts = [F.scaled_dot_product_attention(qe[None], ke[None], ve[None], dropout_p=dropout, is_causal=True,
                                            scale=scaling, enable_gqa=gqa)[0]
             for qe, ke, ve in zip(q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1), strict=True)]
    return torch.cat(parts, dim=1)


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch a model on eager/sdpa attention to `PACKED_ATTENTION`; False when it uses another kernel
    (flash attention already reads the position ids as example boundaries)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
    config._attn_implementation = PACKED_ATTENTION
    return True
