"""DPO (`ml.training.dpo`) inside the recipe: the loss on a hand example, log-prob gathering over the
answer tokens, learning a preference with tiny-lm, exact resume (reference recomputed from the frozen
base for a fresh adapter, stored with the training state otherwise) and the evaluation report."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ml.config import Interrupt
from ml.data.tokens import IGNORE
from ml.evaluation import build_report
from ml.training import dpo
from tests.ml.training import datasets as ds
from tests.ml.training.conftest import Run, at_call, make_cfg
from tests.ml.training.test_control import assert_same_weights, state_of


def test_loss_on_a_hand_example() -> None:
    # pair 0: policy prefers the chosen answer more than the reference does; pair 1: less
    policy = torch.tensor([-1.0, -4.0, -2.0, -1.0])  # chosen rows first, then rejected
    reference = torch.tensor([-1.5, -3.0, -1.5, -2.0])
    losses, stats = dpo.dpo_loss(policy, reference, beta=0.5)
    # rewards: chosen 0.5*(0.5)=0.25, 0.5*(-1)=-0.5; rejected 0.5*(-0.5)=-0.25, 0.5*(1)=0.5
    margins = [0.5, -1.0]
    expected = [math.log1p(math.exp(-m)) for m in margins]  # -log sigmoid(m)
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert stats["chosen_reward"].tolist() == pytest.approx([0.25, -0.5])
    assert stats["rejected_reward"].tolist() == pytest.approx([-0.25, 0.5])
    assert stats["reward_margin"].tolist() == pytest.approx(margins)
    assert stats["reward_accuracy"].tolist() == [1.0, 0.0]
    same, _ = dpo.dpo_loss(policy, policy.clone(), beta=0.1)
    assert same.tolist() == pytest.approx([math.log(2.0)] * 2)  # policy == reference: ln 2


class Uniform(torch.nn.Module):
    """Logits of zeros: every token has log-prob -log(vocab)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: object) -> object:
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_sequence_logps_sum_the_answer_tokens_only() -> None:
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 0]])
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8], [IGNORE, 6, 7, IGNORE]])  # 2 learned tokens each
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    out = dpo.sequence_logps(Uniform(10), {"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert out.tolist() == pytest.approx([-2 * math.log(10)] * 2)


def _pairs(tmp_path: Path, n: int = 24) -> tuple[Path, Path]:
    rows = ds.preference_rows(n)
    return ds.write_jsonl(tmp_path / "train.jsonl", rows), ds.write_jsonl(tmp_path / "valid.jsonl", rows[:8])


def test_reward_accuracy_rises(tmp_path: Path, run_recipe: Callable[..., Run]) -> None:
    train, valid = _pairs(tmp_path)
    cfg = make_cfg("tiny-lm", "causal_lm", "lora", method="dpo", beta=0.1, n_epochs=4, batch_size=4,
                   learning_rate=3e-2)
    run = run_recipe(cfg, train, valid)
    assert run.outcome.completed
    first, last = run.hooks.train_metrics[0][1], run.hooks.eval_metrics[-1][1]
    assert first["train_loss"] == pytest.approx(math.log(2.0), abs=1e-4)  # a fresh adapter is the reference
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    report = build_report(run.recipe, "valid.jsonl")
    assert report is not None and report["method"] == "dpo" and report["validation_examples"] == 8
    base, tuned = report["metrics"]["base"], report["metrics"]["fine_tuned"]
    print(f"\nDPO tiny-lm LoRA, 8 validation pairs: reward_accuracy {base['reward_accuracy']} -> "
          f"{tuned['reward_accuracy']}, valid_loss {base['valid_loss']:.3f} -> {tuned['valid_loss']:.3f}, "
          f"logp_margin {base['logp_margin']:.2f} -> {tuned['logp_margin']:.2f}")
    assert last["reward_accuracy"] >= 0.875 and tuned == last
    assert tuned["valid_loss"] < base["valid_loss"] - 0.1
    assert tuned["logp_margin"] > base["logp_margin"] + 1.0


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_pause_and_resume_is_exact(kind: str, tmp_path: Path, run_recipe: Callable[..., Run]) -> None:
    train, valid = _pairs(tmp_path, 16)
    cfg = make_cfg("tiny-lm", "causal_lm", kind, method="dpo", n_epochs=2, batch_size=4, learning_rate=1e-2,
                   gradient_accumulation_steps=2, training_type={"lora_dropout": 0.2})
    full = run_recipe(cfg, train, valid)
    paused = run_recipe(cfg, train, valid, interrupt=at_call(5, Interrupt.paused))  # mid-accumulation
    ckpt, info = paused.hooks.checkpoints[-1]
    stored = (ckpt / "training_state" / dpo.REFERENCE_FILE).exists()
    assert stored == (kind == "full")  # a fresh adapter's reference is the frozen base: recomputed
    assert 0 < info.step < full.outcome.step
    resumed = run_recipe(cfg, train, valid, resume_dir=ckpt)
    assert resumed.outcome.completed and resumed.outcome.step == full.outcome.step
    assert_same_weights(state_of(full), state_of(resumed))
    a, b = full.outcome.final_metrics, resumed.outcome.final_metrics
    assert b["valid_loss"] == pytest.approx(a["valid_loss"], abs=1e-6)
    tail = [m for s, m in full.hooks.train_metrics if s > info.step]
    got = [m for _, m in resumed.hooks.train_metrics]
    for key in ("train_loss", "reward_accuracy", "reward_margin"):
        assert [m[key] for m in got] == pytest.approx([m[key] for m in tail], abs=1e-6)


def test_dpo_after_sft_uses_the_sft_model_as_reference(tmp_path: Path, run_recipe: Callable[..., Run]) -> None:
    """model=ft:... of a LoRA job: the adapter continues, and the reference is the SFT model (stored)."""
    sft_data = ds.write_jsonl(tmp_path / "chat.jsonl", ds.chat_rows(16))
    sft = run_recipe(make_cfg("tiny-lm", "causal_lm", "lora", n_epochs=1, batch_size=4), sft_data)
    sft_dir = sft.hooks.checkpoints[-1][0]
    train, valid = _pairs(tmp_path, 8)
    cfg = make_cfg("tiny-lm", "causal_lm", "lora", method="dpo", n_epochs=1, batch_size=4, learning_rate=1e-2,
                   checkpoint_every_steps=1)
    run = run_recipe(cfg, train, valid, init_dir=sft_dir)
    assert run.hooks.train_metrics[0][1]["train_loss"] == pytest.approx(math.log(2.0), abs=1e-4)
    assert (run.hooks.checkpoints[0][0] / "training_state" / dpo.REFERENCE_FILE).exists()


def test_pairs_learn_only_the_answer_and_keep_it_when_truncated() -> None:
    from app.models_registry.catalog import local_base
    from ml.data.formats import normalize
    from ml.data.tokens import encode_pairs, load_tokenizer_no_torch

    tok = load_tokenizer_no_torch(local_base("tiny-lm").path)
    record = normalize({
        "input": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "earlier"},
                               {"role": "user", "content": "What color is the sky? " * 6}]},
        "preferred_output": [{"role": "assistant", "content": "Blue."}],
        "non_preferred_output": [{"role": "assistant", "content": "No idea at all."}],
    })[1]
    (pair,), skipped = encode_pairs([record], tok, 512)
    assert skipped == 0
    for example, answer in ((pair.chosen, "Blue."), (pair.rejected, "No idea at all.")):
        learned = [t for t in example.labels or [] if t != IGNORE]
        assert str(tok.decode(learned)).startswith(answer)  # the answer (and its end-of-turn), not "earlier"
    short = len(pair.rejected.input_ids) - 10
    (cut,), _ = encode_pairs([record], tok, short)
    assert len(cut.rejected.input_ids) == short  # the prompt lost its oldest tokens ...
    assert cut.rejected.labels == (pair.rejected.labels or [])[-short:]  # ... and the answer is whole
