"""Summed losses per task (the loop divides by the target count of the whole accumulation window,
so gradient accumulation gives exactly the gradient of one big batch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ml.config import Task
from ml.training.data import IGNORE


def loss_sum(task: Task, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = logits.float()
    if task is Task.causal_lm:  # position t predicts token t+1
        shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
        return F.cross_entropy(
            shifted, batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
    if task is Task.masked_lm:
        flat = logits.reshape(-1, logits.shape[-1])
        return F.cross_entropy(flat, batch["labels"].reshape(-1), ignore_index=IGNORE, reduction="sum")
    if task is Task.classification:
        return F.cross_entropy(logits, batch["targets"], reduction="sum")
    return F.mse_loss(logits.squeeze(-1), batch["targets"], reduction="sum")


def predictions(task: Task, logits: torch.Tensor) -> torch.Tensor:
    """Class index (classification) or value (regression) per example."""
    if task is Task.classification:
        return logits.argmax(dim=-1)
    return logits.float().squeeze(-1)
