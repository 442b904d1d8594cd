"""Metrics, training-state round trips, batching and collation."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from app.models_registry.catalog import base_model_path, get_spec
from ml.config import Task
from ml.modeling import load_tokenizer
from ml.training import data as D
from ml.training.metrics import classification_metrics, improved, perplexity, regression_metrics
from ml.training.state import capture_rng, load_state, restore_rng, save_state
from tests.ml.training import datasets as ds


def test_classification_metrics() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 2, 0])
    m = classification_metrics(preds, labels, 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class precision 1/2, 2/3, 1; recall 1/2, 1, 1/2
    assert m["precision"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert m["recall"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    f1 = [0.5, 0.8, 2 / 3]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    per_class = {k: v for k, v in m.items() if k.startswith("recall_")}
    assert per_class == {"recall_0": 0.5, "recall_1": 1.0, "recall_2": 0.5}
    named = classification_metrics(np.array([1, 1, 0]), np.array([1, 1, 1]), 3, ["ham", "spam", "other"])
    assert named["recall_spam"] == pytest.approx(2 / 3) and "recall_ham" not in named  # absent from the labels
    assert classification_metrics(np.array([1, 1]), np.array([1, 1]), 4)["macro_f1"] == 1.0
    assert improved("recall_spam", 0.9, 0.8, 0.0) and not improved("recall_spam", 0.7, 0.8, 0.0)


def test_regression_metrics_and_perplexity() -> None:
    m = regression_metrics(np.array([1.0, 2.0, 4.0]), np.array([1.0, 3.0, 2.0]))
    assert m == {"mse": pytest.approx(5 / 3), "mae": pytest.approx(1.0)}
    assert perplexity(0.0) == 1.0 and perplexity(1e9) < float("inf")
    assert improved("valid_loss", 0.5, 0.6, 0.0) and not improved("valid_loss", 0.59, 0.6, 0.05)
    assert improved("accuracy", 0.9, 0.8, 0.0) and not improved("accuracy", 0.7, 0.8, 0.0)


def test_training_state_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    save_state(tmp_path, opt, sched, capture_rng(), {"step": 3})
    expected = (torch.rand(3), np.random.rand(), random.random())
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.bin"))

    opt2 = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1 / (s + 1))
    rng, state = load_state(tmp_path, opt2, sched2)
    restore_rng(rng)
    assert state == {"step": 3}
    assert torch.equal(torch.rand(3), expected[0])
    assert np.random.rand() == expected[1] and random.random() == expected[2]
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid, st in a["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["state"][pid][k])
    assert sched2.state_dict() == sched.state_dict()


def test_epoch_batches_are_seeded_and_length_grouped() -> None:
    lengths = [random.Random(i).randint(3, 60) for i in range(103)]
    a = D.epoch_batches(lengths, 8, seed=1, epoch=0)
    assert a == D.epoch_batches(lengths, 8, seed=1, epoch=0)
    assert a != D.epoch_batches(lengths, 8, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(103))
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a])
    assert spread < 10  # grouped: far less than the 57 of random batches


@pytest.fixture(scope="module")
def tiny_tok():  # type: ignore[no-untyped-def]
    return load_tokenizer(base_model_path(get_spec("tiny-lm")))


def test_causal_lm_labels(tiny_tok) -> None:  # type: ignore[no-untyped-def]
    chat = D.encode(ds.chat_rows(6), Task.causal_lm, tiny_tok, 128, None, True).examples
    for ex in chat:
        learned = [t for t in ex.labels or [] if t != D.IGNORE]
        text = tiny_tok.decode(learned)
        assert text.startswith("The ") and text.endswith("<|end|>") and "Ignore" not in text
    pc = D.encode(ds.prompt_completion_rows(2), Task.causal_lm, tiny_tok, 128, None, True).examples[0]
    learned = [t for t in pc.labels or [] if t != D.IGNORE]
    assert learned[-1] == tiny_tok.eos_token_id and "Color" not in tiny_tok.decode(learned)
    text = D.encode([{"text": "one two three " * 40}], Task.causal_lm, tiny_tok, 32, None, True).examples
    assert len(text) > 1 and all(len(e.input_ids) <= 32 and e.labels == e.input_ids for e in text)


def test_collator_pads_to_longest_and_masks_deterministically() -> None:
    tok = load_tokenizer(base_model_path(get_spec("minilm-l6")))
    examples = D.encode(
        [{"text": "a short one"}, {"text": "a somewhat longer sentence with more words"}],
        Task.masked_lm,
        tok,
        64,
        None,
        False,
    ).examples
    col = D.Collator(Task.masked_lm, tok, pad_left=False, seed=3)
    b1, b2 = col(examples, (0, 5)), col(examples, (0, 5))
    assert b1["input_ids"].shape[1] == max(len(e.input_ids) for e in examples)  # dynamic padding
    assert torch.equal(b1["input_ids"], b2["input_ids"]) and torch.equal(b1["labels"], b2["labels"])
    assert int(b1["n_targets"]) >= 2  # at least one target per row
    masked = (b1["labels"] != D.IGNORE) & (b1["input_ids"] == tok.mask_token_id)
    assert masked.sum() <= b1["n_targets"]


def test_mlm_masking_rates() -> None:
    tok = load_tokenizer(base_model_path(get_spec("minilm-l6")))
    rows = [{"text": " ".join(["word"] * 60)} for _ in range(64)]
    examples = D.encode(rows, Task.masked_lm, tok, 64, None, False).examples
    batch = D.Collator(Task.masked_lm, tok, pad_left=False, seed=0)(examples, (0, 0))
    targets = batch["labels"] != D.IGNORE
    rate = targets.sum().item() / batch["attention_mask"].sum().item()
    as_mask = (batch["input_ids"][targets] == tok.mask_token_id).float().mean().item()
    assert 0.12 < rate < 0.18 and 0.72 < as_mask < 0.88
    assert not targets[:, 0].any()  # [CLS] is never a target


def test_label_checks() -> None:
    names = D.label_names_from([{"text": "a", "label": "b"}, {"text": "c", "label": "a"}])
    assert names == ["a", "b"]
    with pytest.raises(
        ValueError, match=r"validation data has labels that are not in the training data: \['z'\]"
    ):
        D.check_labels([{"text": "x", "label": "z"}], names, "validation")
    with pytest.raises(ValueError, match="at least 2 distinct labels"):
        D.label_names_from([{"text": "a", "label": "b"}])
