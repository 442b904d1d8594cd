"""How long a job takes, phase by phase: the duration model behind `POST /v1/fine_tuning/estimate`, a new
job's `estimated_finish`, and the live ETA while it runs. Pure arithmetic plus one small read; no torch.

A job's wall time, created -> finished:

  queue        the jobs ahead (queued or running) finish first: the latest of their `estimated_finish`
               (one training worker, as embedded mode runs; with several it is an upper bound), plus
               the broker's hand-over to a worker
  setup        the worker loads the base model and tokenizer, reads and tokenizes the files, builds
               the optimizer (per model, measured; plus a fresh worker's imports and first load when no
               job started since the API process did, building a builtin model the first time, and
               for DPO scoring the reference model on every training pair)
  train        trained tokens / training tokens per second (per model and training type, measured;
               or the mean of this model's recent succeeded jobs: "measured" basis), plus a small
               per-step cost (the metrics event and progress written each step)
  evaluations  evaluation passes x validation tokens / evaluation tokens per second
  checkpoints  saves x (bytes / write bandwidth + a fixed cost): weights (adapters alone for LoRA and
               prompt tuning) and AdamW's two moments per trainable parameter
  report       the end-of-job evaluation report: the base model loaded again and scored on the
               validation file; chat models also generate answers (both models, up to 32 examples in
               batches of 16)
  final        the final save (weights only), the copy into storage and the success transaction

`DEFAULT_SPEEDS` was measured on the 2-core development VM (torch 2.13 CPU, one torch thread, shared
with other work) by `python bench/estimate_accuracy.py --write rates.json`; an operator on other hardware
runs the same and copies the figures here. With a "measured" basis, the compute phases (evaluations,
report, reference scoring) scale with the measured/default training speed ratio: same hardware factor.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.orm import JobEvent
from ml.config import TrainingKind

# Machine-wide costs (seconds, bytes/s), measured like the table below.
DISPATCH_SECONDS = 0.7  # created -> a worker claims it, nothing ahead (embedded broker polling)
COLD_START_SECONDS = 28.0  # a worker's first job: importing torch, transformers and peft, first model load
TOKENIZE_TOKENS_PER_SECOND = 50_000.0  # the worker reading and tokenizing the files
STEP_OVERHEAD_SECONDS = 0.03  # per optimizer step: the metrics event, progress (tiny-lm, minilm-l6: 0.03)
SAVE_BYTES_PER_SECOND = 100e6  # serialize + copy into storage, per checkpoint byte
PARALLEL_EFFICIENCY = 0.9  # per device of a data-parallel group; assumed, not measured on GPUs here
FINISH_FIXED_SECONDS = 0.5  # registration: result CSV, model row, events, webhook
GENERATION_LIMIT, GENERATION_BATCH = 32, 16  # ml.evaluation's (torch-free copy)
TABLE_THREADS = 1  # the table's torch threads
THREAD_EXPONENT = 0.6  # compute speed-up for n/TABLE_THREADS more threads: (n/1)^0.6; assumed, not measured
TABLE_LOAD_PER_CORE = 4.5  # 1-minute load average per core while the table was measured (9 on 2 cores)
LOAD_EXPONENT = 1.5  # fitted, see load_factor
LOAD_FACTOR_MAX = 6.0  # an idle box: about what the same jobs measured there before (tiny-lm 4.4x, minilm-l6 9x)


@dataclass(frozen=True)
class ModelSpeeds:
    train_tokens_per_second: dict[TrainingKind, float]
    eval_tokens_per_second: float  # forward passes over the validation set, no grad
    setup_seconds: float  # load weights + tokenizer, optimizer, before the first step (a warm worker)
    report_load_seconds: float  # the base model loaded again for the evaluation report
    save_seconds: float  # per checkpoint, besides the bytes: tokenizer, info, the row and its events
    generate_batch_seconds: float = 0.0  # one batch of <= 16 greedy answers (decoders, chat / completion)
    build_seconds: float = 0.0  # a builtin model's first build (`data_dir/base_models/<id>`)


def _kinds(lora: float, full: float, freeze: float, prompt: float) -> dict[TrainingKind, float]:
    """Training tokens/s per type; QLoRA: LoRA less 4-bit dequantization (about a third slower, not
    measured here: it needs CUDA)."""
    return {TrainingKind.lora: lora, TrainingKind.full: full, TrainingKind.freeze: freeze,
            TrainingKind.prompt_tuning: prompt, TrainingKind.qlora: lora * 0.66}


# Measured 2026-11-29 on the 2-core VM at load average 5-9 (bench/estimate_accuracy.py: the README's
# examples). LoRA is measured for every model, full for tiny-lm; the other types keep the ratios to LoRA
# measured on minilm-l6 and tiny-lm before (full 0.21x and freeze 1.6x on minilm, freeze 1.9x on tiny-lm).
DEFAULT_SPEEDS: dict[str, ModelSpeeds] = {
    "tiny-lm": ModelSpeeds(_kinds(6_000.0, 6_000.0, 11_400.0, 6_000.0), eval_tokens_per_second=15_000.0,
                           setup_seconds=0.5, report_load_seconds=0.3, save_seconds=0.1,
                           generate_batch_seconds=0.5, build_seconds=0.5),
    "minilm-l6": ModelSpeeds(_kinds(150.0, 32.0, 236.0, 129.0), eval_tokens_per_second=350.0,
                             setup_seconds=1.0, report_load_seconds=0.5, save_seconds=0.25),
    "smollm2-135m": ModelSpeeds(_kinds(21.0, 4.5, 33.0, 18.0), eval_tokens_per_second=50.0,
                                setup_seconds=5.0, report_load_seconds=8.0, save_seconds=0.8,
                                generate_batch_seconds=27.0),
}
# Models the table does not know: minilm-l6's figures scaled by parameters (compute grows about linearly).
FALLBACK_MODEL, FALLBACK_PARAMS = "minilm-l6", 22.7e6


def speeds_for(model: str, params: int | None) -> ModelSpeeds:
    known = DEFAULT_SPEEDS.get(model)
    if known is not None:
        return known
    base = DEFAULT_SPEEDS[FALLBACK_MODEL]
    scale = FALLBACK_PARAMS / params if params else 1.0  # a bigger model is slower
    slower = 1 / min(1.0, scale)
    return ModelSpeeds({k: v * scale for k, v in base.train_tokens_per_second.items()},
                       base.eval_tokens_per_second * scale, base.setup_seconds * slower,
                       base.report_load_seconds * slower, base.save_seconds * slower,
                       DEFAULT_SPEEDS["smollm2-135m"].generate_batch_seconds * slower)


def thread_factor(torch_threads: int, device: str, cpu_count: int | None = None) -> float:
    """Compute speed relative to the table's one thread, for a CPU worker (TUNEHOUSE_TORCH_THREADS, 0:
    half the cores, as `ml.runtime.auto_threads`); 1 on a GPU, where the table does not apply anyway."""
    if device not in ("cpu", "auto"):
        return 1.0
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    threads = min(torch_threads or max(1, cores // 2), cores)
    return float((threads / TABLE_THREADS) ** THREAD_EXPONENT)


def load_factor(load: float | None, cores: int) -> float:
    """Speed now relative to when the table was measured, on a shared CPU host, from the 1-minute load
    average per core: ((table load + 1) / (load + 1))^1.5, at most LOAD_FACTOR_MAX. Fitted to the
    estimate_accuracy runs on the 2-core VM (speed vs the table: 0.7x at load 12, 1.8x at 6, 4x at 3);
    more than 1/(load + 1) alone: caches and memory bandwidth are shared too. Embedded mode only: there
    the API shares the worker's host, so its load average is the worker's."""
    if load is None or cores <= 0:
        return 1.0
    table = TABLE_LOAD_PER_CORE * cores
    return float(min(LOAD_FACTOR_MAX, ((table + 1.0) / (max(0.0, load) + 1.0)) ** LOAD_EXPONENT))


@dataclass(frozen=True)
class Work:
    """What a job does, counted by the estimate (tokens, steps, sizes)."""

    model: str
    kind: TrainingKind
    train_tokens: int  # one epoch
    validation_tokens: int
    validation_examples: int
    steps_per_epoch: int
    n_epochs: int
    max_steps: int | None
    eval_every_steps: int
    checkpoint_every_steps: int
    params: int | None  # the base model's parameters (None: unknown)
    trainable_params: int | None
    generates: bool  # the report generates answers (causal LM on prompts)
    dpo: bool = False
    built: bool = True  # the base model's weights exist already
    cold: bool = False  # no job started since this API process did: the worker is likely fresh too
    world: int = 1  # processes of the attempt (resources.devices x nodes)
    sharded: bool = False  # fsdp: every rank runs every evaluation batch (no split)

    @property
    def parallel(self) -> float:
        """Compute speed-up of the group over one device: data parallel loses a share to gradient
        all-reduces (PARALLEL_EFFICIENCY, a typical NCCL figure for models that fit; on a CPU box the
        processes share the cores, and `bench/distributed.py` measured 0.45 on 2 busy ones)."""
        return 1.0 if self.world <= 1 else self.world * PARALLEL_EFFICIENCY


@dataclass(frozen=True)
class Counts:
    steps: int
    epochs: float  # epochs actually run (max_steps may stop earlier)
    evaluations: int
    checkpoints: int
    checkpoint_bytes: int
    final_bytes: int


@dataclass
class Durations:
    """Seconds per phase; `run` is started -> finished, `total` created -> finished."""

    queue: float = 0.0
    setup: float = 0.0
    train: float = 0.0
    evaluations: float = 0.0
    checkpoints: float = 0.0
    report: float = 0.0
    final: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def run(self) -> float:
        return self.setup + self.train + self.evaluations + self.checkpoints + self.report + self.final

    @property
    def total(self) -> float:
        return self.queue + self.run

    @property
    def tail(self) -> float:
        """What follows the last training step: the report and the final save."""
        return self.report + self.final

    def as_dict(self) -> dict[str, float]:
        out = {k: round(v, 1) for k, v in asdict(self).items() if k != "extra"}
        return {**out, "run": round(self.run, 1), "total": round(self.total, 1)}


def _due(total: int, every: int, per_epoch: int) -> int:
    """Evaluations or checkpoints in a run of `total` steps: every `every` steps (0: at each epoch's
    end), and one more at the end when the last step was not one (as `TrainingRecipe._finish` does)."""
    period = every if every > 0 else per_epoch
    return total // period + (1 if total % period else 0)


def counts(w: Work) -> Counts:
    per_epoch = max(1, w.steps_per_epoch)
    steps = per_epoch * w.n_epochs
    if w.max_steps is not None:
        steps = max(1, min(steps, w.max_steps))
    evals = _due(steps, w.eval_every_steps, per_epoch) if w.validation_tokens else 0
    trainable = w.trainable_params if w.trainable_params is not None else (w.params or 0)
    whole = w.kind in (TrainingKind.full, TrainingKind.freeze)  # saved whole; adapters alone otherwise
    weights = 4 * (w.params or 0) if whole else 4 * trainable
    return Counts(steps, steps / per_epoch, evals, _due(steps, w.checkpoint_every_steps, per_epoch),
                  weights + 8 * trainable, weights)


def durations(w: Work, c: Counts, speeds: ModelSpeeds, train_tps: float, speedup: float,
              queue_seconds: float, fixed_speedup: float = 1.0) -> Durations:
    """`train_tps`: training tokens/s in force (the table's, or measured); `speedup`: the compute
    factor for the other compute phases (threads and load, or measured / default); `fixed_speedup`:
    the factor for loading and saving (the host's load)."""
    eval_tps = speeds.eval_tokens_per_second * speedup
    prep = (w.train_tokens + w.validation_tokens) / TOKENIZE_TOKENS_PER_SECOND
    setup = speeds.setup_seconds + prep + (0.0 if w.built else speeds.build_seconds)
    setup = (setup + (COLD_START_SECONDS if w.cold else 0.0)) / fixed_speedup
    if w.dpo:  # the reference model scores every training pair once
        setup += w.train_tokens / eval_tps
    one_eval = w.validation_tokens / eval_tps
    report = 0.0
    if w.validation_tokens:
        # the base model loaded and scored; the tuned one's last evaluation is reused
        report = speeds.report_load_seconds / fixed_speedup + one_eval
        if w.generates:
            batches = math.ceil(min(GENERATION_LIMIT, w.validation_examples) / GENERATION_BATCH)
            report += 2 * batches * speeds.generate_batch_seconds / speedup
    return Durations(
        queue=queue_seconds, setup=setup,
        train=w.train_tokens * c.epochs / (train_tps * w.parallel) + c.steps * STEP_OVERHEAD_SECONDS,
        evaluations=c.evaluations * one_eval / (1.0 if w.sharded else w.parallel),  # DDP splits the batches
        checkpoints=c.checkpoints * (speeds.save_seconds + c.checkpoint_bytes / SAVE_BYTES_PER_SECOND) / fixed_speedup,
        report=report, final=(FINISH_FIXED_SECONDS + c.final_bytes / SAVE_BYTES_PER_SECOND) / fixed_speedup,
    )


def queue_seconds(ahead_finishes: list[datetime], now: datetime) -> float:
    """The wait before a worker takes a new job: until the last job ahead is due to finish."""
    latest = max(((f - now).total_seconds() for f in ahead_finishes), default=0.0)
    return DISPATCH_SECONDS + max(0.0, latest)


# --- while the job runs ----------------------------------------------------------------------------

class LiveEta:
    """Seconds left, from the job's own pace: the time per step since the first step this attempt saw
    (setup excluded; evaluations and checkpoints inside the loop included), for the steps left, plus
    the tail after the last step (the report and the final save, from the estimate), scaled by how much
    faster or slower the steps run than estimated (the same host does both). None until two steps were
    seen."""

    def __init__(self, tail_seconds: float, estimated_step_seconds: float | None = None) -> None:
        self.tail, self.step_estimate = tail_seconds, estimated_step_seconds
        self._first: tuple[int, float] | None = None

    def remaining(self, step: int, total_steps: int, now: float) -> float | None:
        if self._first is None:
            self._first = (step, now)
            return None
        first_step, t0 = self._first
        if step <= first_step:
            return None
        per_step = (now - t0) / (step - first_step)
        pace = min(4.0, max(0.25, per_step / self.step_estimate)) if self.step_estimate else 1.0
        return per_step * max(0, total_steps - step) + self.tail * pace


@dataclass(frozen=True)
class Stored:
    """What the live ETA reads from the estimate stored with the job."""

    tail_seconds: float = 0.0
    step_seconds: float | None = None  # estimated time per step inside the training loop


def stored(estimate: Any) -> Stored:
    """From an estimate stored with the job (the creation event's `breakdown`)."""
    breakdown = estimate.get("breakdown") if isinstance(estimate, dict) else None
    if not isinstance(breakdown, dict):
        return Stored()
    loop = sum(float(breakdown.get(k) or 0.0) for k in ("train", "evaluations", "checkpoints"))
    steps = int(estimate.get("steps") or 0)
    return Stored(float(breakdown.get("report") or 0.0) + float(breakdown.get("final") or 0.0),
                  loop / steps if steps and loop else None)


def live_eta(session: Session, job_id: str) -> LiveEta:
    """A live ETA for the job, from its creation estimate (its "Estimated ..." event)."""
    data = session.scalar(select(JobEvent.data).where(JobEvent.job_id == job_id,
                                                      JobEvent.message.startswith("Estimated "))
                          .order_by(JobEvent.seq.desc()).limit(1))
    s = stored((data or {}).get("estimate"))
    return LiveEta(s.tail_seconds, s.step_seconds)
