"""The evaluation report at the end of a job with a validation file: the base model and the
fine-tuned model scored side by side on the validation examples with the task's metrics.

"Base" is the catalog base model as the job started from it: for classification / regression a
fresh task head initialised with the job's seed (the head the job itself started with, so about
chance level), for causal / masked LM the pretrained LM head (its zero-shot loss and perplexity).
When the catalog says the base ships no pretrained head for an LM task (`BaseModelSpec.new_head`),
a zero-shot score would only measure a random head: the base row is then `{"head": "new"}` and
there is no delta. Both models see exactly the batches (and MLM masks) the recipe's own evaluation
uses, so the fine-tuned column equals the job's last validation metrics. Classification metrics
include each class's recall (`recall_<label>`).

Report (stored in `jobs.evaluation`, shown as the job's `evaluation`, sent as an event):
    {"validation_file", "validation_examples", "base_model", "task",
     "metrics": {"base": {...}, "fine_tuned": {...}}, "delta": {metric: fine_tuned - base}}
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from ml.config import Hooks, RecipeConfig, Task
from ml.modeling import autocast, forward_logits, load_task_model
from ml.models.base import BaseModelSpec
from ml.training.losses import loss_sum, predictions
from ml.training.metrics import classification_metrics, higher_is_better, perplexity, regression_metrics
from ml.training.state import seed_everything

log = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]


class Evaluable(Protocol):
    """What the report reads from a trained recipe (`TrainingRecipe` provides it)."""

    @property
    def cfg(self) -> RecipeConfig: ...
    @property
    def hooks(self) -> Hooks: ...
    @property
    def task(self) -> Task: ...
    @property
    def model(self) -> torch.nn.Module: ...
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def label_names(self) -> list[str] | None: ...
    @property
    def base_dir(self) -> Path: ...
    @property
    def spec(self) -> BaseModelSpec: ...

    def eval_batches(self) -> list[Batch]:
        """Fixed validation batches; empty without validation examples."""

    def current_metrics(self) -> dict[str, float] | None:
        """The last evaluation's metrics when it scored the current weights."""


def score(model: torch.nn.Module, batches: list[Batch], task: Task, device: torch.device, n_labels: int,
          interrupted: Callable[[], object | None] | None = None,
          label_names: list[str] | None = None) -> dict[str, float] | None:
    """Validation loss + task metrics of `model`: the one evaluation loop (the recipe's and the report's).
    None as soon as `interrupted()` answers non-None. `label_names` name the per-class recalls."""
    was_training = model.training
    model.eval()
    loss, count, preds, targets = 0.0, 0, [], []
    try:
        with torch.no_grad():
            for batch in batches:
                if interrupted is not None and interrupted() is not None:
                    return None
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast(device):
                    logits = forward_logits(model, batch, task)
                loss += float(loss_sum(task, logits, batch))
                count += int(batch["n_targets"])
                if "targets" in batch:
                    preds.append(predictions(task, logits).cpu())
                    targets.append(batch["targets"].cpu())
    finally:
        model.train(was_training)
    return task_metrics(task, loss / max(count, 1), preds, targets, n_labels, label_names)


def task_metrics(task: Task, valid_loss: float, preds: list[torch.Tensor], targets: list[torch.Tensor],
                 n_labels: int, label_names: list[str] | None = None) -> dict[str, float]:
    out = {"valid_loss": valid_loss}
    if task in (Task.causal_lm, Task.masked_lm):
        out["perplexity"] = perplexity(valid_loss)
    elif task is Task.classification:
        out |= classification_metrics(torch.cat(preds).numpy(), torch.cat(targets).numpy(), n_labels,
                                      label_names)
    else:
        out |= regression_metrics(torch.cat(preds).numpy(), torch.cat(targets).numpy())
    return out


def base_model(recipe: Evaluable) -> torch.nn.Module:
    """A fresh base model for the job's task, its head initialised with the job's seed."""
    seed_everything(recipe.cfg.seed)
    model: torch.nn.Module = load_task_model(recipe.task, recipe.base_dir, recipe.tokenizer, recipe.label_names)
    return model.to(recipe.device)


def _score(recipe: Evaluable, model: torch.nn.Module, batches: list[Batch]) -> dict[str, float] | None:
    names = recipe.label_names
    return score(model, batches, recipe.task, recipe.device, len(names or []), recipe.hooks.interrupted, names)


def _score_base(recipe: Evaluable, batches: list[Batch]) -> dict[str, Any] | None:
    if recipe.spec.new_head(recipe.task.value):
        return {"head": "new"}  # a random LM head's loss says nothing about the base model
    base = base_model(recipe)
    try:
        return _score(recipe, base, batches)
    finally:
        del base
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def build_report(recipe: Evaluable, validation_file: str | None) -> dict[str, Any] | None:
    """None when the job has no validation examples or was interrupted while scoring."""
    batches = recipe.eval_batches()
    if not batches:
        return None
    tuned = recipe.current_metrics() or _score(recipe, recipe.model, batches)
    before = _score_base(recipe, batches)
    if tuned is None or before is None:
        return None
    delta = {k: tuned[k] - before[k] for k in tuned if isinstance(before.get(k), float)}
    examples = sum(len(b["input_ids"]) for b in batches)  # each example is in exactly one batch
    return {"validation_file": validation_file, "validation_examples": examples,
            "base_model": recipe.cfg.base_model, "task": recipe.task.value,
            "metrics": {"base": before, "fine_tuned": tuned}, "delta": delta}


def summary(report: dict[str, Any]) -> str:
    """One line: each metric base -> fine-tuned, with a word on whether that is better."""
    base, tuned = report["metrics"]["base"], report["metrics"]["fine_tuned"]
    if base.get("head") == "new":
        scores = ", ".join(f"{key} {value:.4g}" for key, value in tuned.items())
        return (f"Evaluation on {report['validation_file']}: the base model has no pretrained {report['task']} "
                f"head, so there is no base score; fine-tuned: {scores}")
    parts = []
    for key in tuned:
        if key in base:
            better = tuned[key] > base[key] if higher_is_better(key) else tuned[key] < base[key]
            parts.append(f"{key} {base[key]:.4g} -> {tuned[key]:.4g}{'' if better else ' (not better)'}")
    return f"Evaluation on {report['validation_file']} (base -> fine-tuned): " + ", ".join(parts)


def safe_report(recipe: Evaluable, validation_file: str | None, hooks: Hooks) -> dict[str, Any] | None:
    """`build_report`, but a failure only costs the report (a warning event), never the job."""
    try:
        return build_report(recipe, validation_file)
    except Exception as exc:
        log.exception("evaluation report failed")
        hooks.message(f"Evaluation report skipped: {type(exc).__name__}: {exc}"[:2000], level="warn")
        return None
