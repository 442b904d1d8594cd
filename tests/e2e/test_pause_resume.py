"""Over HTTP with real Celery worker processes: pause a running job (it checkpoints and stops),
resume it on a NEW worker process that finishes it; early stopping; from_checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.e2e.conftest import Proc, wait_for
from tests.e2e.data import chat_rows, write_jsonl
from tests.ml.training.datasets import sentiment_rows

pytestmark = pytest.mark.slow
TERMINAL = ("succeeded", "failed", "cancelled")


def _client(live_server: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server}/v1", api_key=api_key, max_retries=0)


def _upload(client: openai.OpenAI, path: Path, rows: list[dict[str, Any]]) -> str:
    with open(write_jsonl(path, rows), "rb") as fh:
        return client.files.create(file=fh, purpose="fine-tune").id


def _job(client: openai.OpenAI, job_id: str) -> Any:
    return client.fine_tuning.jobs.retrieve(job_id)


def _finished(client: openai.OpenAI, job_id: str, timeout: float, worker: Proc) -> Any:
    job = wait_for(lambda: (j := _job(client, job_id)).status in TERMINAL and j, timeout, "the job to finish")
    assert job.status == "succeeded", (job.error, worker.tail())
    return job


def _events(client: openai.OpenAI, job_id: str) -> list[Any]:
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=1000))))  # oldest first


def _train_steps(events: list[Any]) -> list[int]:
    return [e.data["step"] for e in events if e.type == "metrics" and e.data and "train_loss" in e.data]


def test_pause_then_resume_on_a_new_worker(live_server: str, api_key: str, tmp_path: Path,
                                          start_worker: Callable[..., Proc]) -> None:
    client = _client(live_server, api_key)
    body: dict[str, Any] = {
        "model": "tiny-lm", "training_file": _upload(client, tmp_path / "t.jsonl", chat_rows(40)), "seed": 3,
        "hyperparameters": {"n_epochs": 50, "batch_size": 4},
        "training_type": {"type": "lora", "lora_r": 4}, "max_seq_length": 64, "checkpoint_every_steps": 100}
    estimate = httpx.post(f"{live_server}/v1/fine_tuning/estimate", json=body,
                          headers={"Authorization": f"Bearer {api_key}"}, timeout=60).json()
    job_id = client.fine_tuning.jobs.create(**{k: body.pop(k) for k in ("model", "training_file", "seed",
                                                                       "hyperparameters")},
                                            extra_body=body).id
    first = start_worker()
    wait_for(lambda: (_job(client, job_id).progress or {}).get("step", 0) >= 1, 240, "training to start")
    client.fine_tuning.jobs.pause(job_id)
    paused = wait_for(lambda: (j := _job(client, job_id)).status in ("paused", *TERMINAL) and j, 30, "pause")
    assert paused.status == "paused", first.tail()
    events = _events(client, job_id)
    (at,) = [e for e in events if e.message.startswith("Job paused at step")]
    step = int(at.message.split("step ")[1].split(";")[0])
    assert 0 < step < estimate["steps"]
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job_id))
    assert max(c.step_number for c in checkpoints) == step  # the pause saved the state of its step
    first.stop()  # this worker is gone: another process must finish the job

    assert client.fine_tuning.jobs.resume(job_id).status == "queued"
    second = start_worker()
    job = _finished(client, job_id, 300, second)
    assert first.p.returncode is not None
    events = _events(client, job_id)
    started = [e for e in events if e.message.startswith("Fine-tuning job started")][-1]
    assert started.data["resumed_from_step"] == step
    assert f"resuming from checkpoint at step {step}" in started.message
    assert any(f"resuming at step {step}" in e.message for e in events)
    assert _train_steps(events) == list(range(1, estimate["steps"] + 1))  # every step exactly once
    assert job.trained_tokens == estimate["trained_tokens"]  # the resumed run counts on from the checkpoint


def test_early_stopping_then_from_checkpoint(live_server: str, api_key: str, tmp_path: Path,
                                            start_worker: Callable[..., Proc]) -> None:
    client = _client(live_server, api_key)
    train = _upload(client, tmp_path / "t.jsonl", sentiment_rows(48))
    valid = _upload(client, tmp_path / "v.jsonl", sentiment_rows(16, seed=9))
    common = {"task": "classification", "training_type": {"type": "lora", "lora_r": 4}, "learning_rate": 2e-2,
              "max_seq_length": 64}
    # min_delta is huge: only the first evaluation counts as an improvement -> stops at the 3rd (step 6)
    first_id = client.fine_tuning.jobs.create(
        model="tiny-lm", training_file=train, validation_file=valid, seed=4,
        hyperparameters={"n_epochs": 10, "batch_size": 8},
        extra_body={**common, "eval_every_steps": 2,
                    "early_stopping": {"patience": 2, "min_delta": 100.0}}).id
    worker = start_worker()
    first = _finished(client, first_id, 240, worker)
    events = _events(client, first_id)
    assert any(e.message == "Early stopping at step 6: validation loss stopped improving" for e in events)
    assert first.progress["step"] == 6 and first.progress["step"] < 60
    evals = [e.data for e in events if e.type == "metrics" and "valid_loss" in (e.data or {})]
    assert [e["step"] for e in evals] == [2, 4, 6]
    assert first.evaluation["metrics"]["fine_tuned"] == {k: v for k, v in evals[-1].items()
                                                         if k not in ("step", "attempt")}
    assert set(first.evaluation["metrics"]["base"]) == set(first.evaluation["delta"]) >= {"accuracy"}
    ckpt = next(c for c in client.fine_tuning.jobs.checkpoints.list(first_id) if c.step_number == 6)

    second_id = client.fine_tuning.jobs.create(
        model="tiny-lm", training_file=train, seed=4, hyperparameters={"n_epochs": 1, "batch_size": 8},
        extra_body={**common, "from_checkpoint": ckpt.fine_tuned_model_checkpoint}).id
    _finished(client, second_id, 240, worker)
    later = _events(client, second_id)
    assert any("Continuing the checkpoint's LORA adapter" in e.message for e in later)
    first_loss = {job: next(e.data["train_loss"] for e in evs if "train_loss" in (e.data or {}))
                  for job, evs in ((first_id, events), (second_id, later))}
    assert first_loss[second_id] < first_loss[first_id]  # it starts where the first job stopped


def test_repeated_pauses_do_not_use_up_attempts(committed_db: sessionmaker[Session], tmp_path: Path) -> None:
    """More pauses than max_attempts, then the job still finishes (a pause is not a lost worker).
    In-process worker (app.jobs.runner.run_job); a thread pauses the job once it is training."""
    import threading
    import time

    from app.jobs.runner import run_job
    from tests.jobs.realdb import committed_clients, job_body, upload

    client = committed_clients(committed_db, "pauses")[0]
    body = job_body(upload(client, chat_rows(40)), "causal_lm", "lora", 2e-2,
                    hyperparameters={"n_epochs": 50, "batch_size": 4}, checkpoint_every_steps=1000)
    job_id = client.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    url = f"/v1/fine_tuning/jobs/{job_id}"

    def pause_when_training(after: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = client.get(url).json()
            if job["status"] == "running" and job["progress"].get("step", 0) > after:
                break
            time.sleep(0.05)
        client.post(f"{url}/pause")

    for _ in range(3):  # the default max_attempts
        step = client.get(url).json()["progress"].get("step", 0)
        pauser = threading.Thread(target=pause_when_training, args=(step,))
        pauser.start()
        assert run_job(job_id, "w") == "paused"
        pauser.join()
        assert client.post(f"{url}/resume").status_code == 200
    assert run_job(job_id, "w") == "succeeded", client.get(url).json()
    assert client.get(url).json()["attempt"] == 1
