"""Direct preference optimization (Rafailov et al. 2023) as a loss inside `ml.training.recipe`: the
recipe's loop, optimizer, checkpoints and resume are unchanged; a DPO job only encodes pairs, collates
them and computes this loss.

A batch of B pairs is 2B rows (the B preferred answers, then the B non-preferred ones), each its prompt
plus the answer, with labels on the answer's tokens only (`ml.data.tokens.encode_pairs`, which finds
them with `ml.data.chat`). A row's log-probability is the sum over those tokens. With beta, the policy
pi and the reference model ref:

    reward(y) = beta * (log pi(y | x) - log ref(y | x))
    loss      = -log sigmoid(reward(preferred) - reward(non-preferred))

The reference is the model the job starts from, scored once before training (`Reference`): with the
adapter disabled (`PeftModel.disable_adapter()`) when this job trains a fresh LoRA / prompt-tuning
adapter, so the frozen base recomputes it identically on every attempt; otherwise (full and freeze
fine-tunes, an adapter continued from an `ft:` model) from the starting weights, saved with the
training state (`reference.safetensors`) so a resumed run uses exactly the same values.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file, save_file

from ml.data.tokens import IGNORE, Example, Pair
from ml.errors import TrainingDataError
from ml.training.data import Collator
from ml.training.evalloop import eval_pass

Batch = dict[str, torch.Tensor]
REFERENCE_FILE = "reference.safetensors"
REF_KEY = "ref_logps"  # (2B,) reference log-probs of a batch's rows, in row order
STAT_KEYS = ("reward_accuracy", "chosen_reward", "rejected_reward", "reward_margin")


# --- batches ------------------------------------------------------------------------------------


class PairCollator:
    """B pairs -> 2B padded rows (preferred first); `n_targets` counts pairs (the loss is per pair), and
    the pairs' reference log-probs ride along once `Reference` has set them."""

    def __init__(self, rows: Collator) -> None:
        self.rows = rows
        self.pad_id = rows.pad_id

    def __call__(self, pairs: Sequence[Pair], key: tuple[int, int]) -> Batch:
        batch = self.rows(rows_of(pairs), key)
        batch["n_targets"] = torch.tensor(len(pairs))
        refs = [p.reference for p in pairs if p.reference is not None]
        if len(refs) == len(pairs):
            batch[REF_KEY] = torch.tensor([c for c, _ in refs] + [r for _, r in refs], dtype=torch.float32)
        return batch


def rows_of(pairs: Sequence[Pair]) -> list[Example]:
    return [p.chosen for p in pairs] + [p.rejected for p in pairs]


# --- log-probs and the loss -----------------------------------------------------------------------


def is_prompt_learning(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel) and bool(model.active_peft_config.is_prompt_learning)


def sequence_logps(model: torch.nn.Module, batch: Batch, prompt_learning: bool = False) -> torch.Tensor:
    """Sum of the log-probabilities of each row's labelled (answer) tokens, fp32, shape (rows,).
    Positions follow the attention mask, so a row scores the same however much padding its batch has."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    kwargs: dict[str, Any] = {}
    if not prompt_learning:  # peft prepends virtual tokens and lays out positions itself
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    logits = logits[:, -ids.shape[1] :].float()  # prompt tuning: drop the virtual-token positions
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    learned = labels != IGNORE
    picked = torch.gather(logits[:, :-1].log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * learned).sum(-1)


def dpo_loss(
    policy: torch.Tensor, reference: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair sigmoid DPO losses from (2B,) log-probs (preferred rows first), and per-pair stats:
    the implicit rewards, their margin and whether the preferred answer's reward is the higher."""
    n = policy.shape[0] // 2
    rewards = beta * (policy - reference.to(policy))
    chosen, rejected = rewards[:n], rewards[n:]
    margin = chosen - rejected
    stats = {"reward_accuracy": (margin > 0).float(), "chosen_reward": chosen.detach(),
             "rejected_reward": rejected.detach(), "reward_margin": margin.detach()}
    return -F.logsigmoid(margin), stats


class StepStats:
    """Sums of the per-pair stats over the pairs of a logging window (what the recipe logs, as means)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.pairs = 0
        self.reset()

    def reset(self) -> None:
        self.sums, self.pairs = dict.fromkeys(STAT_KEYS, 0.0), 0

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for key in STAT_KEYS:
            self.sums[key] += float(stats[key].sum())
        self.pairs += int(stats["reward_margin"].numel())

    def take(self) -> dict[str, float]:
        """The sums so far (mergeable across steps: "pairs" counts them); resets."""
        out = self.sums | {"pairs": float(self.pairs)}
        self.reset()
        return out


def means(sums: dict[str, float]) -> dict[str, float]:
    pairs = max(sums.get("pairs", 0.0), 1.0)
    return {key: sums[key] / pairs for key in STAT_KEYS if key in sums}


class Objective:
    """The loss the recipe calls per micro-batch (a sum over its pairs, like `losses.loss_sum`)."""

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.stats = StepStats()

    def loss_sum(self, model: torch.nn.Module, batch: Batch, prompt_learning: bool | None = None,
                 counted: bool = True) -> torch.Tensor:
        """`model` may be a DDP wrapper (then say whether the model inside learns a prompt); `counted`
        False: a rank's stand-in row (`World.shard`), trained at weight 0 and kept out of the stats."""
        if REF_KEY not in batch:
            raise RuntimeError("a DPO batch without reference log-probs")
        prompt = is_prompt_learning(model) if prompt_learning is None else prompt_learning
        losses, stats = dpo_loss(sequence_logps(model, batch, prompt), batch[REF_KEY], self.beta)
        if counted:
            self.stats.add(stats)
        return losses.sum()


# --- the reference model ----------------------------------------------------------------------------


class Reference:
    """Scores every pair with the reference model once, before training (see the module docstring)."""

    def __init__(self, adapter_disabled: bool) -> None:
        self.adapter_disabled = adapter_disabled  # else: stored with the training state

    def prepare(self, model: torch.nn.Module, sets: dict[str, list[Pair]], batches: Callable[[list[Pair]], list[Batch]],
                device: torch.device, resume_state: Path | None) -> None:
        if resume_state is not None and not self.adapter_disabled:
            self._load(resume_state, sets)
            return
        with self._reference_model(model) as ref:
            for pairs in sets.values():
                logps = score_logps(ref, batches(pairs), device, is_prompt_learning(model))
                _attach(pairs, logps)

    @contextlib.contextmanager
    def _reference_model(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        if not self.adapter_disabled:
            yield model
            return
        if not isinstance(model, PeftModel):
            raise RuntimeError("an adapter reference needs a peft model")
        with model.disable_adapter():
            yield model

    def save(self, state_dir: Path, sets: dict[str, list[Pair]]) -> None:
        if self.adapter_disabled:
            return  # the frozen base gives the same values on every attempt
        tensors = {name: torch.tensor([list(p.reference or (math.nan, math.nan)) for p in pairs]).reshape(-1, 2)
                   for name, pairs in sets.items()}
        save_file(tensors, str(state_dir / REFERENCE_FILE))

    def _load(self, state_dir: Path, sets: dict[str, list[Pair]]) -> None:
        path = state_dir / REFERENCE_FILE
        if not path.exists():
            raise TrainingDataError("the checkpoint to resume has no DPO reference log-probs")
        stored = load_file(str(path))
        for name, pairs in sets.items():
            values = stored.get(name)
            if values is None or values.shape[0] != len(pairs):
                raise TrainingDataError(f"the checkpoint's DPO reference does not match the {name} pairs")
            for pair, (chosen, rejected) in zip(pairs, values.tolist(), strict=True):
                pair.reference = (chosen, rejected)


def score_logps(model: torch.nn.Module, batches: list[Batch], device: torch.device, prompt_learning: bool
                ) -> list[tuple[float, float]]:
    """(preferred, non-preferred) log-probs of each pair of `batches`, in order, in eval mode."""
    was_training = model.training
    model.eval()
    out: list[tuple[float, float]] = []
    try:
        with torch.no_grad():
            for batch in batches:
                logps = sequence_logps(model, {k: v.to(device) for k, v in batch.items()}, prompt_learning).cpu()
                n = logps.shape[0] // 2
                out += list(zip(logps[:n].tolist(), logps[n:].tolist(), strict=True))
    finally:
        model.train(was_training)
    return out


def _attach(pairs: list[Pair], logps: list[tuple[float, float]]) -> None:
    for pair, ref in zip(pairs, logps, strict=True):
        pair.reference = ref


# --- evaluation -----------------------------------------------------------------------------------


def evaluate(model: torch.nn.Module, batches: list[Batch], beta: float, device: torch.device,
             interrupted: Callable[[], object | None] | None = None) -> dict[str, float] | None:
    """Validation DPO loss, reward stats, and the model's own ranking of the pairs: `preference_accuracy`
    (share of pairs where the preferred answer is more likely) and `logp_margin` (mean log-prob gap)."""
    stats, sums = StepStats(), {"loss": 0.0, "ranked": 0.0, "gap": 0.0}

    def step(batch: Batch) -> None:
        policy = sequence_logps(model, batch, is_prompt_learning(model))
        losses, pair_stats = dpo_loss(policy, batch[REF_KEY], beta)
        stats.add(pair_stats)
        n = policy.shape[0] // 2
        sums["loss"] += float(losses.sum())
        sums["ranked"] += float((policy[:n] > policy[n:]).float().sum())
        sums["gap"] += float((policy[:n] - policy[n:]).sum())

    if not eval_pass(model, batches, device, step, interrupted):
        return None
    pairs = max(stats.pairs, 1)
    return {"valid_loss": sums["loss"] / pairs, **means(stats.take()),
            "preference_accuracy": sums["ranked"] / pairs, "logp_margin": sums["gap"] / pairs}


def reference_metrics(batches: list[Batch]) -> dict[str, float]:
    """The reference model's row of the report, from the batches' reference log-probs: its DPO metrics are
    those of a policy equal to the reference (loss ln 2, rewards 0); its own ranking of the pairs is the
    baseline tuning improves on."""
    chosen = torch.cat([b[REF_KEY][: b[REF_KEY].shape[0] // 2] for b in batches])
    rejected = torch.cat([b[REF_KEY][b[REF_KEY].shape[0] // 2 :] for b in batches])
    return {"valid_loss": math.log(2.0), "reward_accuracy": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0,
            "reward_margin": 0.0, "preference_accuracy": float((chosen > rejected).float().mean()),
            "logp_margin": float((chosen - rejected).mean())}
