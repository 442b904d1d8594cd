"""The evaluation report at the end of a job with a validation file: the base model and the
fine-tuned model scored side by side on the validation examples with the task's metrics.

"Base" is the catalog base model as the job started from it: for classification / regression a
fresh task head initialised with the job's seed (the head the job itself started with, so about
chance level), for causal / masked LM the pretrained LM head (its zero-shot loss and perplexity).
Both models see exactly the batches (and MLM masks) the recipe's own evaluation uses, so the
fine-tuned column equals the job's last validation metrics.

Report (stored in `jobs.evaluation`, shown as the job's `evaluation`, sent as an event):
    {"validation_file", "validation_examples", "base_model", "task",
     "metrics": {"base": {...}, "fine_tuned": {...}}, "delta": {metric: fine_tuned - base}}
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from ml.config import Hooks, Task
from ml.modeling import forward_logits, load_task_model
from ml.training import data as D
from ml.training.losses import loss_sum, predictions
from ml.training.metrics import HIGHER_IS_BETTER, classification_metrics, perplexity, regression_metrics
from ml.training.recipe import TrainingRecipe, seed_everything

log = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]


def eval_batches(recipe: TrainingRecipe) -> list[Batch]:
    """The recipe's validation batches: same plan, same collation keys (-1, i) as `recipe.evaluate`."""
    lengths = [len(e.input_ids) for e in recipe.valid_set]
    plan = D.eval_batches(lengths, recipe.cfg.batch_size)
    return [recipe.collator([recipe.valid_set[i] for i in idx], (-1, n)) for n, idx in enumerate(plan)]


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def task_metrics(task: Task, valid_loss: float, preds: list[torch.Tensor], targets: list[torch.Tensor],
                 n_labels: int) -> dict[str, float]:
    out = {"valid_loss": valid_loss}
    if task in (Task.causal_lm, Task.masked_lm):
        out["perplexity"] = perplexity(valid_loss)
    elif task is Task.classification:
        out |= classification_metrics(torch.cat(preds).numpy(), torch.cat(targets).numpy(), n_labels)
    else:
        out |= regression_metrics(torch.cat(preds).numpy(), torch.cat(targets).numpy())
    return out


def score(model: torch.nn.Module, batches: list[Batch], task: Task, device: torch.device, n_labels: int,
          hooks: Hooks | None = None) -> dict[str, float] | None:
    """Validation loss + task metrics of `model`; None if the job is interrupted meanwhile."""
    was_training = model.training
    model.eval()
    loss, count, preds, targets = 0.0, 0, [], []
    try:
        with torch.no_grad():
            for batch in batches:
                if hooks is not None and hooks.interrupted() is not None:
                    return None
                batch = {k: v.to(device) for k, v in batch.items()}
                with _autocast(device):
                    logits = forward_logits(model, batch, task)
                loss += float(loss_sum(task, logits, batch))
                count += int(batch["n_targets"])
                if "targets" in batch:
                    preds.append(predictions(task, logits).cpu())
                    targets.append(batch["targets"].cpu())
    finally:
        model.train(was_training)
    return task_metrics(task, loss / max(count, 1), preds, targets, n_labels)


def base_model(recipe: TrainingRecipe) -> torch.nn.Module:
    """A fresh base model for the job's task, its head initialised with the job's seed."""
    seed_everything(recipe.cfg.seed)
    model: torch.nn.Module = load_task_model(recipe.task, recipe.base_dir, recipe.tokenizer, recipe.label_names)
    return model.to(recipe.device)


def _fine_tuned_metrics(recipe: TrainingRecipe, batches: list[Batch],
                        n_labels: int) -> dict[str, float] | None:
    p = recipe.progress
    if p.last_eval_step == p.step and p.eval_metrics:
        return dict(p.eval_metrics)  # the recipe just evaluated the final weights on these batches
    return score(recipe.model, batches, recipe.task, recipe.device, n_labels, recipe.hooks)


def build_report(recipe: TrainingRecipe, validation_file: str | None) -> dict[str, Any] | None:
    """None when the job has no validation examples or was interrupted while scoring."""
    if not recipe.valid_set:
        return None
    batches = eval_batches(recipe)
    n_labels = len(recipe.label_names or [])
    tuned = _fine_tuned_metrics(recipe, batches, n_labels)
    base = base_model(recipe)
    try:
        before = score(base, batches, recipe.task, recipe.device, n_labels, recipe.hooks)
    finally:
        del base
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if tuned is None or before is None:
        return None
    delta = {k: tuned[k] - before[k] for k in tuned if k in before}
    return {"validation_file": validation_file, "validation_examples": len(recipe.valid_set),
            "base_model": recipe.cfg.base_model, "task": recipe.task.value,
            "metrics": {"base": before, "fine_tuned": tuned}, "delta": delta}


def summary(report: dict[str, Any]) -> str:
    """One line: each metric base -> fine-tuned, with a word on whether that is better."""
    base, tuned = report["metrics"]["base"], report["metrics"]["fine_tuned"]
    parts = []
    for key in tuned:
        if key in base:
            better = tuned[key] > base[key] if key in HIGHER_IS_BETTER else tuned[key] < base[key]
            parts.append(f"{key} {base[key]:.4g} -> {tuned[key]:.4g}{'' if better else ' (not better)'}")
    return f"Evaluation on {report['validation_file']} (base -> fine-tuned): " + ", ".join(parts)


def safe_report(recipe: TrainingRecipe, validation_file: str | None, hooks: Hooks) -> dict[str, Any] | None:
    """`build_report`, but a failure only costs the report (a warning event), never the job."""
    try:
        return build_report(recipe, validation_file)
    except Exception as exc:
        log.exception("evaluation report failed")
        hooks.message(f"Evaluation report skipped: {type(exc).__name__}: {exc}"[:2000], level="warn")
        return None
