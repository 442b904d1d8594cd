"""One consistent step history across attempts: metric events carry their attempt, and the result CSV
(built from the events of every attempt) has each step once, re-trained steps replacing abandoned ones."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.jobs.events import metric_curve
from app.jobs.runner import JobHooks, run_job
from app.kit.db import utcnow
from app.orm import Job
from tests.e2e.data import chat_rows
from tests.jobs.realdb import committed_clients, job_body, upload


def _start(attempt: int, resumed_from: int | None) -> tuple[str, dict[str, Any]]:
    return "message", {"attempt": attempt, "resumed_from_step": resumed_from}


def _m(step: int, attempt: int, **values: float) -> tuple[str, dict[str, Any]]:
    return "metrics", {"step": step, **values, "attempt": attempt}


def test_resumed_steps_replace_the_abandoned_ones() -> None:
    events = [_start(1, None), _m(1, 1, loss=9), _m(2, 1, loss=8), _m(2, 1, valid=7), _m(3, 1, loss=6),
              _start(2, 2), _m(3, 2, loss=5), _m(4, 2, loss=4)]
    assert metric_curve(events) == [{"step": 1, "loss": 9}, {"step": 2, "loss": 8, "valid": 7},
                                    {"step": 3, "loss": 5}, {"step": 4, "loss": 4}]


def test_an_attempt_that_got_less_far_drops_the_abandoned_tail() -> None:
    """Attempt 2 dies before re-reaching step 3: attempt 1's step 3 was trained from weights that no
    longer exist in the history, so it is dropped too."""
    events = [_start(1, None), _m(1, 1, loss=9), _m(2, 1, loss=8), _m(3, 1, loss=7), _start(2, 1),
              _m(2, 2, loss=6)]
    assert metric_curve(events) == [{"step": 1, "loss": 9}, {"step": 2, "loss": 6}]


def test_a_restart_without_a_checkpoint_starts_the_curve_over() -> None:
    events = [_start(1, None), _m(1, 1, loss=9), _m(2, 1, loss=8), _start(2, None), _m(1, 2, loss=5)]
    assert metric_curve(events) == [{"step": 1, "loss": 5}]


def test_a_pause_keeps_its_attempt_number_and_its_steps() -> None:
    events = [_start(1, None), _m(1, 1, loss=9), _m(2, 1, loss=8), ("message", {"x": 1}), _start(1, 2),
              _m(3, 1, loss=7)]
    assert [r["step"] for r in metric_curve(events)] == [1, 2, 3]


def test_a_worker_that_lost_its_lease_is_ignored() -> None:
    """Attempt 1 lost its lease but still logs while attempt 2 trains."""
    events = [_start(1, None), _m(1, 1, loss=9), _m(2, 1, loss=8), _start(2, 1), _m(2, 1, loss=100),
              _m(2, 2, loss=6), _m(3, 1, loss=100)]
    assert metric_curve(events) == [{"step": 1, "loss": 9}, {"step": 2, "loss": 6}]


def test_events_without_an_attempt_still_count() -> None:
    """Events written before metric events carried their attempt."""
    events = [("message", {"attempt": 1, "resumed_from_step": None}), ("metrics", {"step": 1, "loss": 2.0}),
              ("metrics", {"step": 2, "loss": 1.0}), ("metrics", None), ("message", None)]
    assert metric_curve(events) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]


class WorkerDied(BaseException):
    """Not an Exception: nothing in the runner catches it, as nothing runs after a kill -9."""


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_a_resumed_job_has_each_step_once(committed_db: sessionmaker[Session],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Attempt 1 checkpoints at step 4 and dies after logging step 6; attempt 2 resumes at step 4 and
    re-trains steps 5 and 6. The events keep both (tagged by attempt); the CSV has each step once,
    with attempt 2's values for the re-trained steps."""
    client = committed_clients(committed_db, "history")[0]
    body = job_body(upload(client, chat_rows(40)), "causal_lm", "lora", 2e-2, checkpoint_every_steps=4)
    job_id = client.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    log_metrics = JobHooks.metrics

    def dies_after_step_6(self: JobHooks, step: int, values: dict[str, float]) -> None:
        log_metrics(self, step, values)
        if self.claim.attempt == 1 and step == 6:
            raise WorkerDied

    monkeypatch.setattr(JobHooks, "metrics", dies_after_step_6)
    with pytest.raises(WorkerDied):
        run_job(job_id, "w1")
    with committed_db.begin() as s:  # its lease runs out: the next delivery takes the job over
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert run_job(job_id, "w2") == "succeeded"

    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["attempt"] == 2
    total = job["progress"]["total_steps"]
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"][::-1]
    train = [(e["data"]["attempt"], e["data"]["step"]) for e in events
             if e["type"] == "metrics" and "train_loss" in e["data"]]
    assert train == [(1, s) for s in range(1, 7)] + [(2, s) for s in range(5, total + 1)]
    loss = {(e["data"]["attempt"], e["data"]["step"]): e["data"]["train_loss"] for e in events
            if e["type"] == "metrics" and "train_loss" in e["data"]}

    rows = list(csv.DictReader(io.StringIO(client.get(f"/v1/files/{job['result_files'][0]}/content").text)))
    assert [int(r["step"]) for r in rows] == list(range(1, total + 1))
    assert "attempt" not in rows[0]
    for r in rows:
        step = int(r["step"])
        assert float(r["train_loss"]) == pytest.approx(loss[(1 if step <= 4 else 2, step)])
