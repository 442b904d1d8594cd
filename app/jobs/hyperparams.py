"""`auto` hyperparameters, chosen from the dataset size the way hosted APIs do."""

from __future__ import annotations

import math

from app.models_registry.catalog import BaseModelSpec
from ml.config import TrainingKind

MIN_TARGET_EXAMPLES = 100  # aim for at least this many example-passes ...
MAX_TARGET_EXAMPLES = 25_000  # ... and at most this many
DEFAULT_EPOCHS = 3

# Base learning rates per training type for a model without measured ones (the catalog's
# `learning_rates`, tuned with bench/quality.py); `learning_rate_multiplier` scales either.
BASE_LR: dict[TrainingKind, float] = {
    TrainingKind.full: 5e-5,
    TrainingKind.lora: 2e-4,
    TrainingKind.qlora: 2e-4,
    TrainingKind.freeze: 1e-3,
    TrainingKind.prompt_tuning: 3e-2,
}


def auto_epochs(n_examples: int) -> int:
    if n_examples * DEFAULT_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(25, math.ceil(MIN_TARGET_EXAMPLES / max(n_examples, 1)))
    if n_examples * DEFAULT_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(1, MAX_TARGET_EXAMPLES // n_examples)
    return DEFAULT_EPOCHS


def auto_batch_size(n_examples: int) -> int:
    """About 0.2% of the examples, a power of two in [4, 32], never above the example count."""
    target = max(1.0, n_examples * 0.002)
    size = 2 ** round(math.log2(target))
    return max(1, min(n_examples, max(4, min(32, size))))


def base_learning_rate(spec: BaseModelSpec, kind: TrainingKind) -> float:
    tuned = spec.learning_rates.get(kind.value)
    if tuned is None and kind is TrainingKind.qlora:
        tuned = spec.learning_rates.get(TrainingKind.lora.value)  # the same adapters on a quantized base
    return tuned if tuned is not None else BASE_LR[kind] * spec.learning_rate_scale


def resolve(
    spec: BaseModelSpec,
    kind: TrainingKind,
    n_examples: int,
    n_epochs: int | str,
    batch_size: int | str,
    lr_multiplier: float | str,
    learning_rate: float | None,
) -> dict[str, float | int]:
    epochs = auto_epochs(n_examples) if n_epochs == "auto" else int(n_epochs)
    batch = auto_batch_size(n_examples) if batch_size == "auto" else int(batch_size)
    multiplier = 1.0 if lr_multiplier == "auto" else float(lr_multiplier)
    lr = learning_rate if learning_rate is not None else base_learning_rate(spec, kind) * multiplier
    return {"n_epochs": epochs, "batch_size": batch, "learning_rate_multiplier": multiplier,
            "learning_rate": lr}
