from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.orm import Checkpoint, Job, Project
from tests.jobs.factories import make_file


@pytest.fixture
def chat_file(db: Session, project_client: tuple[TestClient, Project]) -> str:
    return make_file(db, project_client[1], "chat", rows=40).id


@pytest.fixture
def cls_file(db: Session, project_client: tuple[TestClient, Project]) -> str:
    return make_file(db, project_client[1], "classification", rows=60, labels={"neg": 30, "pos": 30}).id


def _create(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/fine_tuning/jobs", json=body)


def test_create_job_resolves_auto_hyperparameters(client: TestClient, chat_file: str) -> None:
    r = _create(client, model="tiny-lm", training_file=chat_file, suffix="demo", seed=7)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "fine_tuning.job"
    assert job["status"] == "queued"
    assert job["queue_position"] >= 1
    assert job["hyperparameters"]["n_epochs"] == 3  # 40 rows * 3 >= 100
    assert job["hyperparameters"]["batch_size"] == 4
    assert job["task"] == "causal_lm" and job["training_type"]["type"] == "lora"
    assert job["seed"] == 7 and job["user_provided_suffix"] == "demo"
    assert job["method"]["type"] == "supervised"
    assert job["config"]["learning_rate"] == pytest.approx(2e-3)  # lora base 2e-4 x tiny-lm scale 10


def test_method_hyperparameters_and_extensions(client: TestClient, cls_file: str) -> None:
    r = _create(client, model="minilm-l6", training_file=cls_file, task="classification",
                training_type={"type": "lora", "lora_r": 4, "lora_alpha": 8},
                method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2,
                                                                                   "batch_size": 8}}},
                learning_rate=1e-3, max_seq_length=64, warmup_ratio=0.1, weight_decay=0.01,
                gradient_accumulation_steps=2, metadata={"team": "search"}, max_steps=40, max_train_seconds=600)
    assert r.status_code == 200, r.text
    cfg = r.json()["config"]
    assert (cfg["n_epochs"], cfg["batch_size"], cfg["learning_rate"]) == (2, 8, 1e-3)
    assert (cfg["max_steps"], cfg["max_train_seconds"]) == (40, 600)
    assert cfg["training_type"]["lora_r"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert r.json()["metadata"] == {"team": "search"}


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "nope"}, "model"),
    ({"training_file": "file-missing"}, "training_file"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": "big"}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier"),
    ({"task": "translation"}, "task"),
    ({"task": "classification"}, "training_file"),  # chat file can't train a classifier
    ({"training_type": {"type": "lora", "lora_r": 0}}, "training_type.lora_r"),
    ({"training_type": {"type": "lora", "lora_dropout": 1.5}}, "training_type.lora_dropout"),
    ({"training_type": {"type": "adalora"}}, "training_type.type"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"warmup_ratio": 0.9}, "warmup_ratio"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
    ({"max_steps": 0}, "max_steps"),
    ({"max_train_seconds": 0}, "max_train_seconds"),
    ({"checkpoint_every_steps": 1_000_001}, "checkpoint_every_steps"),
    ({"checkpoint_every_steps": 10**30}, "checkpoint_every_steps"),
    ({"eval_every_steps": 10**12}, "eval_every_steps"),
    ({"cleaning": {"max_chars": 10**19}}, "cleaning.max_chars"),
    ({"max_seq_length": 4096}, "max_seq_length"),
    ({"suffix": "has spaces!"}, "suffix"),
    ({"seed": -3}, "seed"),
    ({"method": {"type": "reinforcement"}}, "method.type"),
    ({"unknown_field": 1}, "unknown_field"),
    ({"early_stopping": {"patience": 2}}, "early_stopping"),
    ({"metadata": {str(i): "x" for i in range(17)}}, "metadata"),
])
def test_invalid_specs_are_clear_400s(client: TestClient, chat_file: str, body: dict[str, Any],
                                       param: str) -> None:
    full = {"model": "tiny-lm", "training_file": chat_file, **body}
    r = client.post("/v1/fine_tuning/jobs", json=full)
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["message"] and err["type"] == "invalid_request_error"


def test_cadences_up_to_their_bound_are_accepted(client: TestClient, chat_file: str) -> None:
    r = _create(client, model="tiny-lm", training_file=chat_file, checkpoint_every_steps=1_000_000,
                eval_every_steps=1_000_000)
    assert r.status_code == 200, r.text
    assert r.json()["config"]["checkpoint_every_steps"] == 1_000_000


def test_task_model_mismatch(client: TestClient, cls_file: str) -> None:
    r = _create(client, model="minilm-l6", training_file=cls_file, task="causal_lm")
    assert r.status_code == 400 and r.json()["error"]["param"] == "training_file"


def test_validation_labels_must_be_known(client: TestClient, db: Session,
                                         project_client: tuple[TestClient, Project], cls_file: str) -> None:
    valid = make_file(db, project_client[1], "classification", rows=10, labels={"neg": 5, "meh": 5})
    r = _create(client, model="minilm-l6", training_file=cls_file, validation_file=valid.id,
                task="classification")
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "validation_file" and "meh" in r.json()["error"]["message"]


def test_idempotency_key(client: TestClient, chat_file: str) -> None:
    body = {"model": "tiny-lm", "training_file": chat_file}
    a = client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "k1"}).json()
    b = client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "k1"}).json()
    assert a["id"] == b["id"]
    c = client.post("/v1/fine_tuning/jobs", json={**body, "seed": 3}, headers={"Idempotency-Key": "k1"})
    assert c.status_code == 409 and c.json()["error"]["param"] == "Idempotency-Key"
    d = client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "k2"}).json()
    assert d["id"] != a["id"]


def test_list_retrieve_paginate_and_filter(client: TestClient, chat_file: str) -> None:
    ids = [_create(client, model="tiny-lm", training_file=chat_file,
                   metadata={"n": str(i)}).json()["id"] for i in range(5)]
    page1 = client.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert page1["has_more"] and [j["id"] for j in page1["data"]] == ids[::-1][:2]
    page2 = client.get("/v1/fine_tuning/jobs", params={"limit": 2, "after": page1["last_id"]}).json()
    assert [j["id"] for j in page2["data"]] == ids[::-1][2:4]
    only = client.get("/v1/fine_tuning/jobs", params={"metadata[n]": "3"}).json()
    assert [j["id"] for j in only["data"]] == [ids[3]]
    assert client.get(f"/v1/fine_tuning/jobs/{ids[0]}").json()["id"] == ids[0]
    assert client.get("/v1/fine_tuning/jobs", params={"limit": 0}).status_code == 400


def test_cancel_and_events(client: TestClient, chat_file: str) -> None:
    job = _create(client, model="tiny-lm", training_file=chat_file).json()
    r = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 409
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 50}).json()
    messages = [e["message"] for e in events["data"]]
    assert messages[0].startswith("Job cancelled")  # newest first
    assert any(m.startswith("Created fine-tuning job") for m in messages)
    assert all(e["object"] == "fine_tuning.job.event" for e in events["data"])


def test_pause_resume_queued(client: TestClient, chat_file: str) -> None:
    job = _create(client, model="tiny-lm", training_file=chat_file).json()
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause").json()["status"] == "paused"
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume").json()["status"] == "queued"
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume").status_code == 409


def test_checkpoints_listing(client: TestClient, db: Session, chat_file: str,
                             project_client: tuple[TestClient, Project]) -> None:
    job = _create(client, model="tiny-lm", training_file=chat_file).json()
    for step, loss in ((10, 2.0), (20, 1.5)):
        db.add(Checkpoint(id=f"ftckpt-{step}", job_id=job["id"], project_id=project_client[1].id, step=step,
                          epoch=step / 10, metrics={"train_loss": loss}, storage_key="x",
                          fine_tuned_model_checkpoint=f"ft:x:ckpt-step-{step}", is_best=step == 20))
    db.commit()
    page = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()
    assert [c["step_number"] for c in page["data"]] == [20, 10]
    assert page["data"][0]["metrics"] == {"step": 20, "train_loss": 1.5} and page["data"][0]["is_best"]


def test_cross_project_is_404(client: TestClient, other_client: TestClient, chat_file: str) -> None:
    job = _create(client, model="tiny-lm", training_file=chat_file).json()
    for path in ("", "/events", "/checkpoints"):
        r = other_client.get(f"/v1/fine_tuning/jobs/{job['id']}{path}")
        assert r.status_code == 404, path
    assert other_client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 404
    assert other_client.get("/v1/fine_tuning/jobs").json()["data"] == []
    # another project's file can't be trained on either
    r = other_client.post("/v1/fine_tuning/jobs", json={"model": "tiny-lm", "training_file": chat_file})
    assert r.status_code == 404 and r.json()["error"]["param"] == "training_file"


def test_auth_required(app: Any) -> None:
    anon = TestClient(app)
    r = anon.get("/v1/fine_tuning/jobs")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = anon.get("/v1/fine_tuning/jobs", headers={"Authorization": "Bearer th-wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_models_list(client: TestClient) -> None:
    data = client.get("/v1/models").json()["data"]
    ids = {m["id"] for m in data}
    assert {"minilm-l6", "tiny-lm"} <= ids
    assert client.get("/v1/models/nope").status_code == 404


def test_job_row_state(db: Session, client: TestClient, chat_file: str) -> None:
    job_id = _create(client, model="tiny-lm", training_file=chat_file).json()["id"]
    row = db.get(Job, job_id)
    assert row is not None and row.enqueued_at is not None and row.attempt == 0


def test_fine_tuning_a_fine_tuned_model_continues_from_it(
        client: TestClient, other_client: TestClient, db: Session, chat_file: str,
        project_client: tuple[TestClient, Project]) -> None:
    from app.orm import FineTunedModel

    first = _create(client, model="tiny-lm", training_file=chat_file).json()
    ft = f"ft:tiny-lm:project-a::{first['id']}"
    db.add(FineTunedModel(id=ft, project_id=project_client[1].id, job_id=first["id"], base_model="tiny-lm",
                          task="causal_lm", training_type="lora", storage_key=f"jobs/{first['id']}/final"))
    db.commit()
    r = _create(client, model=ft, training_file=chat_file)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["model"] == ft
    assert job["config"]["base_model"] == "tiny-lm"
    assert job["config"]["init_checkpoint_key"] == f"jobs/{first['id']}/final"
    assert _create(other_client, model=ft, training_file=chat_file).status_code == 404
