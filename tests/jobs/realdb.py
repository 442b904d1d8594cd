"""Helpers for tests that train for real in this process (`app.jobs.runner.run_job`): an app bound to
the committed database (use with the `committed_db` fixture), uploads and a train-and-wait call."""

from __future__ import annotations

import json
import time
from typing import Any

import psutil
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.auth.service import create_api_key, get_or_create_project
from app.jobs.runner import run_job
from app.main import create_app
from app.orm import Checkpoint
from tests.e2e.data import chat_rows


def committed_clients(factory: sessionmaker[Session], *projects: str) -> list[TestClient]:
    """One client per project, on an app whose requests commit for real."""
    app = create_app()
    app.state.sessionmaker = factory
    with factory() as s:
        keys = [create_api_key(s, get_or_create_project(s, name), "t") for name in projects]
        s.commit()
    return [TestClient(app, headers={"Authorization": f"Bearer {k}"}) for k in keys]


def upload(client: TestClient, rows: list[dict[str, Any]], name: str = "train.jsonl") -> str:
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    r = client.post("/v1/files", files={"file": (name, body)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def job_body(training_file: str, task: str, kind: str, lr: float, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny-lm", "training_file": training_file, "seed": 5, "task": task,
            "hyperparameters": {"n_epochs": 2, "batch_size": 8}, "learning_rate": lr, "max_seq_length": 64,
            "training_type": {"type": kind, "lora_r": 4, "num_virtual_tokens": 4}, **extra}


def train(client: TestClient, rows: list[dict[str, Any]], task: str, kind: str, lr: float,
          **extra: Any) -> dict[str, Any]:
    """Create the job over HTTP, run it here to the end, return the job object."""
    r = client.post("/v1/fine_tuning/jobs", json=job_body(upload(client, rows), task, kind, lr, **extra))
    assert r.status_code == 200, r.text
    assert run_job(r.json()["id"], "test-worker") == "succeeded", client.get(
        f"/v1/fine_tuning/jobs/{r.json()['id']}").json()["error"]
    return dict(client.get(f"/v1/fine_tuning/jobs/{r.json()['id']}").json())


def create_group_job(client: TestClient, resources: dict[str, Any], **extra: Any) -> str:
    """A queued tiny-lm LoRA chat job on several processes (`resources`)."""
    body = job_body(upload(client, chat_rows(24)), "causal_lm", "lora", 2e-2, resources=resources, **extra)
    r = client.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "queued"
    return str(r.json()["id"])


def events_oldest_first(client: TestClient, job_id: str) -> list[dict[str, Any]]:
    data = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return list(reversed(data))


def kill_rank_one_after_first_checkpoint(factory: sessionmaker[Session], job_id: str, deadline: float) -> int:
    """SIGKILL the training process of global rank 1 once the job has a checkpoint (a lost device, or a
    lost machine in a gang); its pid."""
    while time.monotonic() < deadline:
        with factory() as s:
            saved = s.scalar(select(Checkpoint.id).where(Checkpoint.job_id == job_id))
        ranks = [p for p in psutil.process_iter(["cmdline", "environ"])
                 if "ml.training.launch" in " ".join(p.info["cmdline"] or [])
                 and "torch.distributed.run" not in " ".join(p.info["cmdline"] or [])
                 and (p.info["environ"] or {}).get("RANK") == "1"]
        if saved and ranks:
            ranks[0].kill()
            return int(ranks[0].pid)
        time.sleep(0.1)
    raise TimeoutError("no checkpoint or no rank 1 to kill")
