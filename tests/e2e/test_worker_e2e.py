"""A job created over HTTP with the openai client runs on a separate Celery worker process
(Postgres + Redis in CI): success, crash-resume after kill -9, cancel, duplicate delivery."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import Proc, wait_for
from tests.e2e.data import chat_rows, write_jsonl

pytestmark = pytest.mark.slow


def _client(live_server: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server}/v1", api_key=api_key, max_retries=0)


def _upload(client: openai.OpenAI, tmp_path: Path, n: int) -> str:
    path = write_jsonl(tmp_path / f"train{n}.jsonl", chat_rows(n))
    with open(path, "rb") as fh:
        return client.files.create(file=fh, purpose="fine-tune").id


def _create(client: openai.OpenAI, file_id: str, epochs: int, **extra: Any) -> str:
    job = client.fine_tuning.jobs.create(
        model="tiny-lm", training_file=file_id, seed=3,
        hyperparameters={"n_epochs": epochs, "batch_size": 4},
        extra_body={"training_type": {"type": "lora", "lora_r": 4}, "max_seq_length": 64, **extra})
    return job.id


def _status(client: openai.OpenAI, job_id: str) -> Any:
    return client.fine_tuning.jobs.retrieve(job_id)


def test_job_succeeds_on_celery_worker(live_server: str, api_key: str, tmp_path: Path,
                                       start_worker: Callable[..., Proc]) -> None:
    client = _client(live_server, api_key)
    job_id = _create(client, _upload(client, tmp_path, 24), epochs=2)
    worker = start_worker()
    job = wait_for(lambda: (j := _status(client, job_id)).status in ("succeeded", "failed") and j, 240,
                   "job to finish")
    assert job.status == "succeeded", (job.error, worker.tail())
    assert job.fine_tuned_model and job.fine_tuned_model.endswith(job_id)
    assert job.trained_tokens and job.trained_tokens > 0 and job.result_files
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job_id))
    assert len(checkpoints) == 2  # one per epoch
    assert sum(bool(getattr(c, "is_best", False)) for c in checkpoints) == 1
    events = list(client.fine_tuning.jobs.list_events(job_id, limit=1000))
    losses = [e.data["train_loss"] for e in reversed(events) if e.type == "metrics" and e.data
              and "train_loss" in e.data]
    assert len(losses) >= 4 and losses[-1] < losses[0]
    assert job.fine_tuned_model in [m.id for m in client.models.list()]
    csv = client.files.content(job.result_files[0]).text
    assert csv.startswith("step,")
    # SSE: the whole history, then `end`; Last-Event-ID resumes after a given event.
    auth = {"Authorization": f"Bearer {api_key}"}
    url = f"{live_server}/v1/fine_tuning/jobs/{job_id}/events?stream=true"
    with httpx.stream("GET", url, headers=auth, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = "".join(r.iter_text())
    ids = [int(line[4:]) for line in body.splitlines() if line.startswith("id: ")]
    assert len(ids) == len(events) and ids == sorted(ids)
    assert body.rstrip().endswith('data: {"status": "succeeded"}')
    with httpx.stream("GET", url, headers={**auth, "Last-Event-ID": str(ids[-3])}, timeout=30) as r:
        tail = "".join(r.iter_text())
    assert [int(line[4:]) for line in tail.splitlines() if line.startswith("id: ")] == ids[-2:]
    # The model answers through the openai client right away.
    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of Peru?"}])
    assert reply.choices[0].message.content is not None and reply.usage and reply.usage.completion_tokens > 0
    ckpt = checkpoints[0].fine_tuned_model_checkpoint
    assert client.completions.create(model=ckpt, prompt="The capital", max_tokens=4).choices[0].text is not None


def test_minilm_classifier_predicts_held_out_labels(live_server: str, api_key: str,
                                                    start_worker: Callable[..., Proc]) -> None:
    client = _client(live_server, api_key)
    samples = Path(__file__).resolve().parents[2] / "samples"
    with open(samples / "sentiment.jsonl", "rb") as fh:
        train = client.files.create(file=fh, purpose="fine-tune").id
    with open(samples / "sentiment_valid.jsonl", "rb") as fh:
        valid = client.files.create(file=fh, purpose="fine-tune").id
    job_id = client.fine_tuning.jobs.create(
        model="minilm-l6", training_file=train, validation_file=valid, seed=1,
        hyperparameters={"n_epochs": 2, "batch_size": 16},
        extra_body={"task": "classification", "training_type": {"type": "lora", "lora_r": 8},
                    "learning_rate": 1e-3, "max_seq_length": 64}).id
    start_worker()
    job = wait_for(lambda: (j := _status(client, job_id)).status in ("succeeded", "failed") and j, 300,
                   "classifier job")
    assert job.status == "succeeded", job.error
    import json

    held_out = [json.loads(line) for line in (samples / "sentiment_valid.jsonl").read_text().splitlines()]
    r = httpx.post(f"{live_server}/v1/predictions", headers={"Authorization": f"Bearer {api_key}"},
                   json={"model": job.fine_tuned_model, "input": [x["text"] for x in held_out]}, timeout=60)
    assert r.status_code == 200, r.text
    predicted = [d["label"] for d in r.json()["data"]]
    accuracy = sum(p == x["label"] for p, x in zip(predicted, held_out, strict=True)) / len(held_out)
    print(f"held-out accuracy of the fine-tuned minilm-l6 classifier: {accuracy:.3f}")
    assert accuracy >= 0.9


def test_kill_9_worker_resumes_from_checkpoint(live_server: str, api_key: str, tmp_path: Path,
                                              start_worker: Callable[..., Proc]) -> None:
    client = _client(live_server, api_key)
    job_id = _create(client, _upload(client, tmp_path, 40), epochs=6, checkpoint_every_steps=4)
    first = start_worker()
    wait_for(lambda: list(client.fine_tuning.jobs.checkpoints.list(job_id)), 240, "a first checkpoint")
    first.kill9()
    job = _status(client, job_id)
    assert job.status == "running" and job.attempt == 1
    start_worker()  # the reaper re-queues after the lease (6 s) expires; this worker resumes
    job = wait_for(lambda: (j := _status(client, job_id)).status in ("succeeded", "failed") and j, 300,
                   "the resumed job to finish")
    assert job.status == "succeeded", job.error
    assert job.attempt == 2
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=200)]
    assert any("re-queued" in m for m in messages)
    assert any("attempt 2" in m and "resuming from checkpoint" in m for m in messages)
    # One history across the kill: each step once in the result CSV; metric events say their attempt.
    content = client.files.content(job.result_files[0]).text
    steps = [int(r["step"]) for r in csv.DictReader(io.StringIO(content))]
    assert steps == list(range(1, job.progress["step"] + 1))
    events = client.fine_tuning.jobs.list_events(job_id, limit=1000)
    assert {e.data["attempt"] for e in events if e.type == "metrics"} == {1, 2}


def test_cancel_stops_running_job_and_duplicates_do_nothing(live_server: str, api_key: str, tmp_path: Path,
                                                           start_worker: Callable[..., Proc]) -> None:
    client = _client(live_server, api_key)
    job_id = _create(client, _upload(client, tmp_path, 40), epochs=30, checkpoint_every_steps=5)
    start_worker()
    wait_for(lambda: list(client.fine_tuning.jobs.checkpoints.list(job_id)), 240, "a checkpoint")
    # A duplicate delivery of the same task while it runs: claimed by nobody, runs nothing.
    from app.kit.broker import get_celery

    get_celery().send_task("tunehouse.run_job", args=[job_id], task_id=job_id)
    client.fine_tuning.jobs.cancel(job_id)
    stopped = wait_for(lambda: any("Training stopped" in e.message for e in
                                   client.fine_tuning.jobs.list_events(job_id, limit=50)), 15,
                       "training to stop after cancel")
    assert stopped
    job = _status(client, job_id)
    assert job.status == "cancelled" and job.attempt == 1
    assert list(client.fine_tuning.jobs.checkpoints.list(job_id))  # kept


def test_readyz(live_server: str) -> None:
    r = httpx.get(f"{live_server}/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"database": "ok", "broker": "ok"}
