"""The evaluation report at the end of a job with a validation file: the base model and the
fine-tuned model scored side by side on the validation examples with the task's metrics.

"Base" is the catalog base model as the job started from it: for classification / regression a
fresh task head initialised with the job's seed (the head the job itself started with, so about
chance level), for causal / masked LM the pretrained LM head (its zero-shot loss and perplexity).
When the catalog says the base ships no pretrained head for an LM task (`BaseModelSpec.new_head`),
a zero-shot score would only measure a random head: the base row is then `{"head": "new"}` and
there is no delta. Both models see exactly the batches (and MLM masks) the recipe's own evaluation
uses, so the fine-tuned column holds the job's last validation metrics. Classification metrics
include each class's recall (`recall_<label>`).

Causal LM also measures behaviour, not only likelihood: both models greedily generate the last
learned span (chat: the last assistant turn; prompt/completion: the completion) of up to
`GENERATION_LIMIT` validation examples, through the serving decoder, and the answers are compared with
the reference: `exact_match` (equal up to whitespace) and `format_match` (the same shape, see
`same_format`), as rates in [0, 1]. Plain-text examples have no prompt and are not generated.

DPO jobs (`ml.training.dpo`) are scored on the validation pairs instead: the reference model (the one
the job started from) against the tuned one, on the DPO loss and rewards and on each model's own ranking
of the pairs (`preference_accuracy`, `logp_margin`); nothing is generated.

Report (stored in `jobs.evaluation`, shown as the job's `evaluation`, sent as an event):
    {"validation_file", "validation_examples", "base_model", "task",
     "metrics": {"base": {...}, "fine_tuned": {...}}, "delta": {metric: fine_tuned - base}}
    (+ "generated_examples": how many examples the generation metrics cover, causal LM only)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from ml.config import Hooks, Method, RecipeConfig, Task
from ml.data.tokens import IGNORE
from ml.modeling import autocast, forward_logits, load_task_model
from ml.models.base import BaseModelSpec
from ml.training.dpo import evaluate as dpo_evaluate
from ml.training.dpo import reference_metrics
from ml.training.evalloop import eval_pass
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


@dataclass
class Sums:
    """One evaluation pass's raw results (a rank's share of a split evaluation): summed loss, its
    target count, and per-example predictions and targets (classification / regression)."""

    loss: float
    count: int
    preds: list[torch.Tensor]
    targets: list[torch.Tensor]


def score_sums(model: torch.nn.Module, batches: list[Batch], task: Task, device: torch.device,
               interrupted: Callable[[], object | None] | None = None) -> Sums | None:
    sums = Sums(0.0, 0, [], [])

    def step(batch: Batch) -> None:
        with autocast(device):
            logits = forward_logits(model, batch, task)
        sums.loss += float(loss_sum(task, logits, batch))
        sums.count += int(batch["n_targets"])
        if "targets" in batch:
            sums.preds.append(predictions(task, logits).cpu())
            sums.targets.append(batch["targets"].cpu())

    return sums if eval_pass(model, batches, device, step, interrupted) else None


def score(model: torch.nn.Module, batches: list[Batch], task: Task, device: torch.device, n_labels: int,
          interrupted: Callable[[], object | None] | None = None,
          label_names: list[str] | None = None) -> dict[str, float] | None:
    """Validation loss + task metrics of `model`: the one evaluation loop (the recipe's and the report's).
    None as soon as `interrupted()` answers non-None. `label_names` name the per-class recalls."""
    sums = score_sums(model, batches, task, device, interrupted)
    if sums is None:
        return None
    return task_metrics(task, sums.loss / max(sums.count, 1), sums.preds, sums.targets, n_labels, label_names)


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


def _score_base(recipe: Evaluable, batches: list[Batch], prompts: list[GenPrompt] | None = None
                ) -> dict[str, Any] | None:
    if recipe.spec.new_head(recipe.task.value):
        return {"head": "new"}  # a random LM head's loss says nothing about the base model
    base = base_model(recipe)
    try:
        return _with_generation(recipe, base, prompts or [], _score(recipe, base, batches))
    finally:
        del base
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def build_report(recipe: Evaluable, validation_file: str | None) -> dict[str, Any] | None:
    """None when the job has no validation examples or was interrupted while scoring."""
    batches = recipe.eval_batches()
    if not batches:
        return None
    if recipe.cfg.method is Method.dpo:
        return _preference_report(recipe, batches, validation_file)
    prompts = generation_prompts(recipe, batches)
    tuned = recipe.current_metrics() or _score(recipe, recipe.model, batches)
    tuned = _with_generation(recipe, recipe.model, prompts, tuned)
    before = _score_base(recipe, batches, prompts) if tuned is not None else None
    if tuned is None or before is None:
        return None
    delta = {k: tuned[k] - before[k] for k in tuned if isinstance(before.get(k), float)}
    examples = sum(len(b["input_ids"]) for b in batches)  # each example is in exactly one batch
    report = {"validation_file": validation_file, "validation_examples": examples,
              "base_model": recipe.cfg.base_model, "task": recipe.task.value,
              "metrics": {"base": before, "fine_tuned": tuned}, "delta": delta}
    return report | ({"generated_examples": len(prompts)} if prompts else {})


def _preference_report(recipe: Evaluable, batches: list[Batch], validation_file: str | None) -> dict[str, Any] | None:
    tuned = recipe.current_metrics() or dpo_evaluate(recipe.model, batches, recipe.cfg.beta, recipe.device,
                                                     recipe.hooks.interrupted)
    if tuned is None:
        return None
    before = reference_metrics(batches)
    delta = {k: tuned[k] - before[k] for k in tuned if k in before}
    pairs = sum(len(b["input_ids"]) // 2 for b in batches)
    return {"validation_file": validation_file, "validation_examples": pairs, "base_model": recipe.cfg.base_model,
            "task": recipe.task.value, "method": Method.dpo.value, "base": "reference (the model the job started from)",
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
            better = tuned[key] > base[key] if _higher_is_better(key) else tuned[key] < base[key]
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


# --- causal LM: generated answers against the references ---------------------------------------

GENERATION_LIMIT = 32  # validation examples generated per model: the report stays quick on CPU
GENERATION_MARGIN = 8  # new tokens past the reference's length: room to show a longer answer, never a ramble
GENERATION_BATCH = 16  # rows decoded together: one step for 16 rows costs far less than 16 steps
GENERATION_METRICS = ("exact_match", "format_match")
_NOT_JSON = object()


@dataclass(frozen=True)
class GenPrompt:
    """A validation example cut before its last learned span: the prompt ids and the reference's ids."""

    ids: list[int]
    reference: list[int]


def _with_generation(recipe: Evaluable, model: torch.nn.Module, prompts: list[GenPrompt],
                     scores: dict[str, float] | None) -> dict[str, float] | None:
    if scores is None or not prompts:
        return scores
    generated = generation_metrics(recipe, model, prompts)
    return None if generated is None else scores | generated


def generation_prompts(recipe: Evaluable, batches: list[Batch], limit: int = GENERATION_LIMIT) -> list[GenPrompt]:
    """The first `limit` causal-LM examples (in evaluation order) whose last learned span follows a
    prompt. Read from the evaluation batches, so the prompts are tokenized exactly as in training."""
    if recipe.task is not Task.causal_lm:
        return []
    out: list[GenPrompt] = []
    for batch in batches:
        if "attention_mask" not in batch:  # a packed batch: rows are several examples run together
            continue
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
            real = mask.bool()
            row, span = ids[real].tolist(), last_span(labels[real].tolist())
            if span is not None:
                out.append(GenPrompt(row[: span[0]], row[span[0] : span[1]]))
            if len(out) >= limit:
                return out
    return out


def last_span(labels: list[int]) -> tuple[int, int] | None:
    """[start, end) of the last run of learned labels; None unless an unlearned prompt precedes it."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return (start, end) if 0 < start < end else None


def generation_metrics(recipe: Evaluable, model: torch.nn.Module,
                       prompts: list[GenPrompt]) -> dict[str, float] | None:
    """`exact_match` and `format_match` rates of `model`'s greedy answers; None if interrupted."""
    tok = recipe.tokenizer
    answers = greedy_answers(model, tok, prompts, recipe.device, recipe.hooks.interrupted)
    if answers is None:
        return None
    return answer_metrics(answers, [_decode(tok, p.reference) for p in prompts])


def answer_metrics(answers: list[str], references: list[str]) -> dict[str, float]:
    n = max(len(references), 1)
    return {"exact_match": sum(map(exact_match, answers, references)) / n,
            "format_match": sum(map(same_format, answers, references)) / n}


def exact_match(answer: str, reference: str) -> bool:
    return answer.split() == reference.split()  # equal up to whitespace


def same_format(answer: str, reference: str) -> bool:
    """The answer has the reference's shape. A reference that is a JSON object or array: the answer
    parses as JSON of the same kind, objects with the same top-level keys (values may differ).
    Any other reference: the answer starts with the same word."""
    ref = _json_container(reference)
    if ref is _NOT_JSON:
        return answer.split()[:1] == reference.split()[:1]
    got = _json_container(answer)
    if isinstance(ref, dict):
        return isinstance(got, dict) and set(got) == set(ref)
    return isinstance(got, list)


def _json_container(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return _NOT_JSON
    return value if isinstance(value, dict | list) else _NOT_JSON


def greedy_answers(model: torch.nn.Module, tok: PreTrainedTokenizerBase, prompts: list[GenPrompt],
                   device: torch.device, interrupted: Callable[[], object | None]) -> list[str] | None:
    """Greedy answers through the serving decoder (`ml.inference.generation`: KV cache, prompt tuning's
    virtual tokens as served), so the report measures what the served model says. None if interrupted."""
    from ml.inference.generation import generate

    target, embed, prefix = _generation_target(model)
    stop = lambda: interrupted() is not None  # noqa: E731 - checked by every row at every token
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = _eos_ids(model, tok)
    answers: list[str] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(device):
            for start in range(0, len(prompts), GENERATION_BATCH):
                rows = _gen_rows(tok, eos, prompts[start : start + GENERATION_BATCH], prefix, stop)
                generate(target, rows, pad_id=pad_id, device=device, embed_model=embed)
                if stop():
                    return None
                answers += [_decode(tok, r.decoder.tokens) for r in rows]
    finally:
        model.train(was_training)
    return answers


def _decode(tok: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return str(tok.decode(ids, skip_special_tokens=True))


def _gen_rows(tok: PreTrainedTokenizerBase, eos: set[int], prompts: list[GenPrompt], prefix: torch.Tensor | None,
              stop: Callable[[], bool]) -> list[Any]:
    from ml.inference.generation import GenRow
    from ml.inference.loading import Tok
    from ml.inference.sampling import RowDecoder, RowParams

    wrapped = Tok(tok)
    return [GenRow(p.ids, RowDecoder(RowParams(len(p.reference) + GENERATION_MARGIN, temperature=0.0), wrapped,
                                     eos, lambda _: None), prefix=prefix, cancelled=stop) for p in prompts]


def _generation_target(model: torch.nn.Module) -> tuple[torch.nn.Module, Any, torch.Tensor | None]:
    """(module to call, module whose embeddings take the prompt, virtual-token embeddings), as served:
    prompt tuning runs the base model on [virtual tokens][prompt] embeddings."""
    if isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning:
        base = model.get_base_model()
        return base, base, model.get_prompt(batch_size=1)[0].detach()
    return model, None, None


def _eos_ids(model: torch.nn.Module, tok: PreTrainedTokenizerBase) -> set[int]:
    """Every id that ends a turn: the tokenizer's eos plus the model config's and generation config's."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    sources = [tok.eos_token_id, getattr(getattr(inner, "config", None), "eos_token_id", None),
               getattr(getattr(inner, "generation_config", None), "eos_token_id", None)]
    ids: set[int] = set()
    for src in sources:
        ids.update([src] if isinstance(src, int) else [int(x) for x in src or []])
    return ids


def _higher_is_better(metric: str) -> bool:
    return metric in GENERATION_METRICS or higher_is_better(metric)
