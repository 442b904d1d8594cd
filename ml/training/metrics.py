"""Evaluation metrics in plain numpy (no sklearn)."""

from __future__ import annotations

import math

import numpy as np

HIGHER_IS_BETTER = {"accuracy", "macro_f1", "precision", "recall",
                    # DPO (`ml.training.dpo`)
                    "reward_accuracy", "reward_margin", "chosen_reward", "preference_accuracy", "logp_margin"}
RECALL_PREFIX = "recall_"  # per-class recall: `recall_<label name>`


def higher_is_better(metric: str) -> bool:
    return metric in HIGHER_IS_BETTER or metric.startswith(RECALL_PREFIX)


def classification_metrics(preds: np.ndarray, labels: np.ndarray, n_classes: int,
                           label_names: list[str] | None = None) -> dict[str, float]:
    """Accuracy plus macro-averaged F1, precision and recall (over the classes that occur), and the
    recall of each class that occurs among the labels (`recall_<name>`: an imbalanced set's minority
    class is what a majority-class model gets wrong)."""
    preds, labels = np.asarray(preds, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        return {}
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, preds), 1)
    tp = np.diag(confusion).astype(np.float64)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = (predicted + actual) > 0  # macro average over classes that occur at all
    names = label_names if label_names is not None and len(label_names) == n_classes else None
    per_class = {f"{RECALL_PREFIX}{names[c] if names else c}": float(recall[c]) for c in np.flatnonzero(actual)}
    return {
        "accuracy": float(tp.sum() / labels.size),
        "macro_f1": float(f1[present].mean()),
        "precision": float(precision[present].mean()),
        "recall": float(recall[present].mean()),
        **per_class,
    }


def regression_metrics(preds: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    preds, targets = np.asarray(preds, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    if targets.size == 0:
        return {}
    err = preds - targets
    return {"mse": float(np.mean(err**2)), "mae": float(np.mean(np.abs(err)))}


def perplexity(mean_loss: float) -> float:
    return float(math.exp(min(mean_loss, 50.0)))  # capped: exp overflows far beyond anything useful


def improved(metric: str, value: float, best: float | None, min_delta: float) -> bool:
    if best is None:
        return True
    if higher_is_better(metric):
        return value > best + min_delta
    return value < best - min_delta
