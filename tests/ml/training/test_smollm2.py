"""SmolLM2-135M-Instruct end to end through the recipes, on chat data (its template has no
`{% generation %}` markers): a short LoRA run teaches a fixed answer format that the base model never
uses, measured with greedy generation on held-out questions (before: the adapter disabled). Full and
prompt tuning train on the same data, and the classification head learns."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from ml import evaluation as ev
from ml.modeling import forward_logits
from tests.ml.training import datasets as ds
from tests.ml.training.conftest import Run, loss_drop, make_cfg

MODEL = "smollm2-135m"
SYSTEM = "Reply in JSON."
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Germany": "Berlin", "Spain": "Madrid",
    "Egypt": "Cairo", "Russia": "Moscow", "China": "Beijing", "Greece": "Athens", "Peru": "Lima",
    "Kenya": "Nairobi", "Norway": "Oslo", "Cuba": "Havana", "Austria": "Vienna", "Poland": "Warsaw",
    "Ireland": "Dublin",
}
COLORS = {"grass": "green", "the sky": "blue", "snow": "white", "coal": "black", "a banana": "yellow",
          "blood": "red"}
TRAIN_QA = (
    [(f"What is the capital of {c}?", a) for c, a in list(CAPITALS.items())[:12]]
    + [(f"What color is {t}?", a) for t, a in list(COLORS.items())[:4]]
    + [(f"What is {a} plus {b}?", str(a + b)) for a, b in [(2, 3), (4, 4), (1, 6), (5, 2)]]
)
HELD_OUT = (
    [f"What is the capital of {c}?" for c in list(CAPITALS)[12:]]
    + [f"What color is {t}?" for t in list(COLORS)[4:]]
    + ["What is 3 plus 3?", "Name a large animal.", "Which planet do we live on?"]
)


def chat(question: str, answer: str | None = None) -> list[dict[str, Any]]:
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return msgs + ([{"role": "assistant", "content": json.dumps({"answer": answer})}] if answer else [])


def in_format(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and list(value) == ["answer"]


@torch.no_grad()
def greedy(model: Any, tok: PreTrainedTokenizerBase, questions: list[str], max_new: int = 16) -> list[str]:
    batch: Any = tok.apply_chat_template([chat(q) for q in questions], add_generation_prompt=True, padding=True,
                                         return_tensors="pt", return_dict=True)
    out = model.generate(**batch, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
    return [t.strip() for t in tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]


@torch.no_grad()
def first_tokens(run: Run, questions: list[str]) -> list[str]:
    """The greedy first answer token per question, through the training forward (prompt tuning
    included: peft's own `generate` mishandles prompt tuning's KV cache under transformers 5)."""
    tok, model = run.recipe.tokenizer, run.recipe.model.eval()
    rows = [prompt_ids(tok, q) for q in questions]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    logits = forward_logits(model, {"input_ids": ids, "attention_mask": mask}, run.recipe.task)
    return [tok.decode(t) for t in logits[:, -1].argmax(-1).tolist()]


def prompt_ids(tok: PreTrainedTokenizerBase, question: str) -> list[int]:
    out: Any = tok.apply_chat_template(chat(question), add_generation_prompt=True, return_dict=True)
    return list(out["input_ids"])


def format_rate(outputs: list[str]) -> float:
    return sum(map(in_format, outputs)) / len(outputs)


def train_rows() -> list[dict[str, Any]]:
    return [{"messages": chat(q, a)} for q, a in TRAIN_QA]


@pytest.mark.slow
def test_lora_teaches_an_answer_format(tmp_path: Path, run_recipe: Callable[..., Run]) -> None:
    train = ds.write_jsonl(tmp_path / "train.jsonl", train_rows())
    cfg = make_cfg(MODEL, "causal_lm", "lora", learning_rate=1e-3, n_epochs=4, batch_size=4, max_seq_length=64,
                   warmup_ratio=0.1)
    run = run_recipe(cfg, train)
    model, tok = run.recipe.model.eval(), run.recipe.tokenizer
    assert isinstance(model, PeftModel)
    with model.disable_adapter():
        before = greedy(model, tok, HELD_OUT)
    after = greedy(model, tok, HELD_OUT)
    first, last = loss_drop(run.hooks.losses)
    print(f"\n{MODEL} lora: {run.outcome.step} steps in {run.seconds:.0f}s, loss {first:.2f} -> {last:.2f}; "
          f"format rate {format_rate(before):.2f} -> {format_rate(after):.2f}")
    for q, b, a in zip(HELD_OUT, before, after, strict=True):
        print(f"  {q!r}: {b!r} -> {a!r}")
    assert run.outcome.completed and last < first
    assert format_rate(before) <= 0.1 and format_rate(after) >= 0.8


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "lr", "batch_size"), [("full", 1e-4, 4), ("prompt_tuning", 0.3, 2)])
def test_full_and_prompt_tuning_train_on_chat(kind: str, lr: float, batch_size: int, tmp_path: Path,
                                              run_recipe: Callable[..., Run]) -> None:
    train = ds.write_jsonl(tmp_path / "train.jsonl", train_rows())
    epochs = 1 if kind == "full" else 2  # full: one checkpoint of weights + optimizer state (1.6 GB) is enough
    cfg = make_cfg(MODEL, "causal_lm", kind, learning_rate=lr, n_epochs=epochs, batch_size=batch_size,
                   max_seq_length=64, warmup_ratio=0.1, training_type={"num_virtual_tokens": 8})
    run = run_recipe(cfg, train)
    first, last = loss_drop(run.hooks.losses)
    starts = first_tokens(run, HELD_OUT)
    braces = sum(t.startswith("{") for t in starts) / len(starts)
    print(f"\n{MODEL} {kind}: {run.outcome.step} steps in {run.seconds:.0f}s, loss {first:.2f} -> {last:.2f}, "
          f"answers opening with '{{' {braces:.2f}: {starts}")
    assert run.outcome.completed and last < 0.6 * first and braces >= 0.5
    assert run.hooks.checkpoints
    # the evaluation report's decoder (serving's: KV cache, prompt tuning's virtual tokens as embeddings)
    # opens each answer with the training forward's greedy token
    prompts = [ev.GenPrompt(prompt_ids(run.recipe.tokenizer, q), [0] * 8) for q in HELD_OUT]
    answers = ev.greedy_answers(run.recipe.model, run.recipe.tokenizer, prompts, run.recipe.device, lambda: None)
    print(f"  generated: {answers}")
    assert answers is not None
    special = set(run.recipe.tokenizer.all_special_tokens)
    assert all(a.startswith(t) for a, t in zip(answers, starts, strict=True) if t not in special)


@pytest.mark.slow
def test_classification_head_learns(tmp_path: Path, run_recipe: Callable[..., Run]) -> None:
    rows = ds.sentiment_rows(48)
    train = ds.write_jsonl(tmp_path / "train.jsonl", rows[:32])
    valid = ds.write_jsonl(tmp_path / "valid.jsonl", rows[32:])
    cfg = make_cfg(MODEL, "classification", "lora", learning_rate=3e-3, n_epochs=3, batch_size=8,
                   max_seq_length=64, warmup_ratio=0.1)
    run = run_recipe(cfg, train, valid)
    accuracy = run.hooks.eval_metrics[-1][1]["accuracy"]
    print(f"\n{MODEL} classification lora: {run.outcome.step} steps in {run.seconds:.0f}s, "
          f"held-out accuracy {accuracy:.2f}")
    assert run.outcome.completed and accuracy >= 0.8
