"""The scaffolding every evaluation pass shares (task metrics in `ml.evaluation.score`, DPO metrics in
`ml.training.dpo.evaluate`): eval mode, no grad, batches moved to the device, an interrupt check before
each batch, and the caller's train mode restored however the pass ends."""

from __future__ import annotations

from collections.abc import Callable

import torch

Batch = dict[str, torch.Tensor]


def eval_pass(model: torch.nn.Module, batches: list[Batch], device: torch.device,
              step: Callable[[Batch], None], interrupted: Callable[[], object | None] | None = None) -> bool:
    """Calls `step` with each batch on `device`; False as soon as `interrupted()` answers non-None
    (a cancel or pause must not wait for a whole validation pass)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                if interrupted is not None and interrupted() is not None:
                    return False
                step({k: v.to(device) for k, v in batch.items()})
    finally:
        model.train(was_training)
    return True
