"""`resources.devices = 2` through the real runner (`run_job`): the worker runs the attempt as a
torchrun group of two CPU (gloo) processes and records it like any other; a rank killed with SIGKILL
takes the group down, the attempt is re-queued and the next one resumes from the last checkpoint."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.jobs.runner import run_job
from tests.jobs.realdb import (
    committed_clients,
    create_group_job,
    events_oldest_first,
    kill_rank_one_after_first_checkpoint,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
DEADLINE_S = 300


@pytest.fixture
def client(committed_db: sessionmaker[Session]) -> TestClient:
    return committed_clients(committed_db, "distributed")[0]


def _create(client: TestClient, **extra: Any) -> str:
    return create_group_job(client, {"devices": 2, "strategy": "ddp"}, **extra)


def _events(client: TestClient, job_id: str) -> list[dict[str, Any]]:
    return events_oldest_first(client, job_id)


def test_a_two_process_job_runs_through_the_worker(client: TestClient) -> None:
    job_id = _create(client)
    assert run_job(job_id, "test-worker") == "succeeded"
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["trained_tokens"] > 0
    assert job["resources"] == {"devices": 2, "nodes": 1, "strategy": "ddp"}
    events = _events(client, job_id)
    (announce,) = [e for e in events if "data parallel over 2 processes" in e["message"]]
    assert announce["data"]["world_size"] == 2 and announce["data"]["backend"] == "gloo"
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics" and "train_loss" in e["data"]]
    assert steps == sorted(steps) and steps[-1] == job["progress"]["step"]
    launch = job["progress"]["launch"]
    assert (launch["world_size"], launch["nodes"], launch["strategy"], launch["backend"]) == (2, 1, "ddp", "gloo")
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert client.get(f"/v1/models/{job['fine_tuned_model']}").status_code == 200


def _kill_a_rank_after_first_checkpoint(factory: sessionmaker[Session], job_id: str, killed: list[int]) -> None:
    killed.append(kill_rank_one_after_first_checkpoint(factory, job_id, time.monotonic() + DEADLINE_S))


def test_a_killed_rank_requeues_the_attempt_which_resumes(client: TestClient,
                                                          committed_db: sessionmaker[Session]) -> None:
    job_id = _create(client, checkpoint_every_steps=1, hyperparameters={"n_epochs": 6, "batch_size": 4})
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_rank_after_first_checkpoint, args=(committed_db, job_id, killed))
    killer.start()
    first = run_job(job_id, "test-worker")
    killer.join(timeout=DEADLINE_S)
    assert killed, "no rank to kill"
    assert first == "queued"
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "queued" and job["attempt"] == 1
    assert any("Training group lost on attempt 1" in e["message"] for e in _events(client, job_id))

    assert run_job(job_id, "test-worker-2") == "succeeded"
    started = [e for e in _events(client, job_id) if e["message"].startswith("Fine-tuning job started")]
    assert "resuming from checkpoint at step" in started[-1]["message"]


def _cancel_once_training(client: TestClient, job_id: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if (client.get(f"/v1/fine_tuning/jobs/{job_id}").json().get("progress") or {}).get("step", 0) >= 1:
            assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200
            return
        time.sleep(0.1)


def test_a_cancel_reaches_every_rank(client: TestClient) -> None:
    job_id = _create(client, hyperparameters={"n_epochs": 50, "batch_size": 4})
    canceller = threading.Thread(target=_cancel_once_training, args=(client, job_id))
    canceller.start()
    assert run_job(job_id, "test-worker") == "cancelled"  # the group stopped: no rank left waiting
    canceller.join(timeout=DEADLINE_S)
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["progress"]["step"] < job["progress"]["total_steps"]
    assert any("stopped at step" in e["message"] for e in _events(client, job_id))
