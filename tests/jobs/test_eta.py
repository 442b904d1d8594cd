"""The duration model's arithmetic (`app.jobs.eta`): phase counts, durations, queue, live ETA."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from app.jobs import eta
from app.kit.db import utcnow
from ml.config import TrainingKind

SPEEDS = eta.ModelSpeeds({k: 100.0 for k in TrainingKind}, eval_tokens_per_second=400.0, setup_seconds=3.0,
                         report_load_seconds=2.0, save_seconds=0.5, generate_batch_seconds=5.0, build_seconds=7.0)
WORK = eta.Work(model="m", kind=TrainingKind.lora, train_tokens=1_000, validation_tokens=200,
                validation_examples=40, steps_per_epoch=10, n_epochs=3, max_steps=None, eval_every_steps=0,
                checkpoint_every_steps=0, params=1_000_000, trainable_params=10_000, generates=False)


def test_counts_per_epoch_and_every_n_steps() -> None:
    c = eta.counts(WORK)
    assert (c.steps, c.epochs, c.evaluations, c.checkpoints) == (30, 3.0, 3, 3)
    assert c.final_bytes == 4 * 10_000 and c.checkpoint_bytes == 4 * 10_000 + 8 * 10_000  # adapter + AdamW
    every = eta.counts(replace(WORK, eval_every_steps=7, checkpoint_every_steps=15))
    assert (every.evaluations, every.checkpoints) == (5, 2)  # 7, 14, 21, 28 + the last step; 15, 30
    capped = eta.counts(replace(WORK, max_steps=12))
    assert (capped.steps, capped.epochs, capped.evaluations, capped.checkpoints) == (12, 1.2, 2, 2)
    full = eta.counts(replace(WORK, kind=TrainingKind.full, trainable_params=1_000_000))
    assert full.final_bytes == 4_000_000 and full.checkpoint_bytes == 12_000_000
    assert eta.counts(replace(WORK, validation_tokens=0)).evaluations == 0


def test_durations_add_up_every_phase() -> None:
    w = replace(WORK, generates=True)
    d = eta.durations(w, eta.counts(w), SPEEDS, train_tps=100.0, speedup=1.0, queue_seconds=4.0)
    one_eval = 200 / 400
    assert d.train == pytest.approx(3_000 / 100 + 30 * eta.STEP_OVERHEAD_SECONDS)
    assert d.setup == pytest.approx(3.0 + 1_200 / eta.TOKENIZE_TOKENS_PER_SECOND)
    assert d.evaluations == pytest.approx(3 * one_eval)
    assert d.checkpoints == pytest.approx(3 * (0.5 + 120_000 / eta.SAVE_BYTES_PER_SECOND))
    assert d.report == pytest.approx(2.0 + one_eval + 2 * 2 * 5.0)  # 32 of 40 examples: 2 batches, 2 models
    assert d.final == pytest.approx(eta.FINISH_FIXED_SECONDS + 40_000 / eta.SAVE_BYTES_PER_SECOND)
    assert d.total == pytest.approx(4.0 + d.run) and d.tail == pytest.approx(d.report + d.final)
    parts = d.as_dict()
    assert set(parts) == {"queue", "setup", "train", "evaluations", "checkpoints", "report", "final", "run", "total"}
    faster = eta.durations(w, eta.counts(w), SPEEDS, train_tps=200.0, speedup=2.0, queue_seconds=0.0)
    assert faster.train - 30 * eta.STEP_OVERHEAD_SECONDS == pytest.approx(3_000 / 200)
    assert faster.evaluations == pytest.approx(d.evaluations / 2)
    loaded = eta.durations(w, eta.counts(w), SPEEDS, 100.0, 1.0, 0.0, fixed_speedup=0.5)
    assert loaded.setup == pytest.approx(2 * d.setup) and loaded.final == pytest.approx(2 * d.final)
    unbuilt_dpo = replace(WORK, built=False, dpo=True, cold=True)
    d2 = eta.durations(unbuilt_dpo, eta.counts(unbuilt_dpo), SPEEDS, 100.0, 1.0, 0.0)
    # a fresh worker's imports, the build, the reference's scoring
    assert d2.setup == pytest.approx(d.setup + eta.COLD_START_SECONDS + 7.0 + 1_000 / 400)


def test_queue_waits_for_the_last_job_ahead() -> None:
    now = utcnow()
    assert eta.queue_seconds([], now) == eta.DISPATCH_SECONDS
    ahead = [now + timedelta(seconds=30), now + timedelta(seconds=90), now - timedelta(seconds=10)]
    assert eta.queue_seconds(ahead, now) == pytest.approx(eta.DISPATCH_SECONDS + 90)
    assert eta.queue_seconds([now - timedelta(seconds=10)], now) == eta.DISPATCH_SECONDS  # overdue: 0


def test_thread_factor() -> None:
    assert eta.thread_factor(0, "cpu", cpu_count=2) == 1.0  # auto: half the cores
    assert eta.thread_factor(4, "cpu", cpu_count=16) == pytest.approx(4 ** eta.THREAD_EXPONENT)
    assert eta.thread_factor(8, "auto", cpu_count=2) == pytest.approx(2 ** eta.THREAD_EXPONENT)  # capped
    assert eta.thread_factor(8, "cuda", cpu_count=16) == 1.0


def test_load_factor() -> None:
    table = eta.TABLE_LOAD_PER_CORE * 2
    assert eta.load_factor(table, 2) == pytest.approx(1.0)
    assert eta.load_factor(2 * table + 1, 2) == pytest.approx(0.5 ** eta.LOAD_EXPONENT)  # twice the competition
    assert eta.load_factor(0.0, 2) == eta.LOAD_FACTOR_MAX  # an idle box, capped
    assert eta.load_factor(None, 2) == 1.0


def test_unknown_models_scale_with_their_size() -> None:
    base = eta.DEFAULT_SPEEDS[eta.FALLBACK_MODEL]
    big = eta.speeds_for("someone/else", int(eta.FALLBACK_PARAMS * 10))
    assert big.train_tokens_per_second[TrainingKind.lora] == pytest.approx(
        base.train_tokens_per_second[TrainingKind.lora] / 10)
    assert eta.speeds_for("tiny-lm", None) is eta.DEFAULT_SPEEDS["tiny-lm"]


def test_live_eta_uses_the_pace_after_the_first_step_plus_the_tail() -> None:
    live = eta.LiveEta(tail_seconds=20.0)
    assert live.remaining(1, 11, now=100.0) is None  # setup's time is not a step's
    assert live.remaining(3, 11, now=104.0) == pytest.approx(2.0 * 8 + 20.0)
    assert live.remaining(11, 11, now=120.0) == pytest.approx(20.0)  # only the report and final save left
    resumed = eta.LiveEta(tail_seconds=0.0)
    assert resumed.remaining(50, 60, now=0.0) is None and resumed.remaining(52, 60, now=10.0) == pytest.approx(40.0)
    slower = eta.LiveEta(tail_seconds=20.0, estimated_step_seconds=1.0)  # steps take twice the estimate:
    slower.remaining(1, 11, now=0.0)
    assert slower.remaining(3, 11, now=4.0) == pytest.approx(2.0 * 8 + 40.0)  # so will the tail
    way_off = eta.LiveEta(tail_seconds=20.0, estimated_step_seconds=100.0)
    way_off.remaining(1, 11, now=0.0)
    assert way_off.remaining(2, 11, now=1.0) == pytest.approx(9.0 + 5.0)  # the scaling is clamped at 1/4


def test_stored_estimate() -> None:
    est = {"steps": 10, "breakdown": {"report": 12.5, "final": 2.0, "train": 30.0, "evaluations": 4.0,
                                      "checkpoints": 1.0}}
    assert eta.stored(est) == eta.Stored(14.5, 3.5)
    assert eta.stored(None) == eta.Stored() and eta.stored({"estimated_seconds": 5}) == eta.Stored()
