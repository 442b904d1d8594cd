"""Jobs run for real by `app.jobs.runner.run_job`: the evaluation report on the job object and in the
events, the cleaning report event, and the estimate against what the job then trained."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from tests.e2e.data import chat_rows
from tests.jobs.realdb import committed_clients, job_body, train, upload
from tests.ml.training import datasets as ds

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture
def client(committed_db: sessionmaker[Session]) -> TestClient:
    return committed_clients(committed_db, "reports")[0]


def _events(client: TestClient, job_id: str) -> list[dict[str, Any]]:
    return list(client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"])


def test_evaluation_and_cleaning_reports(client: TestClient) -> None:
    rows = ds.sentiment_rows(48)
    rows += [*rows[:4], {"text": "Great, mail me at ann@example.com", "label": "positive"}]
    valid = upload(client, ds.sentiment_rows(24, seed=9), "valid.jsonl")
    hp = {"n_epochs": 3, "batch_size": 8}
    job = train(client, rows, "classification", "lora", 2e-2, hyperparameters=hp, validation_file=valid,
                cleaning={"dedupe": True, "scrub_pii": True})
    report = job["evaluation"]
    assert report["validation_file"] == job["validation_file"] and report["task"] == "classification"
    base, tuned = report["metrics"]["base"], report["metrics"]["fine_tuned"]
    assert tuned["accuracy"] > base["accuracy"] and tuned["valid_loss"] < base["valid_loss"]
    assert report["delta"]["valid_loss"] == pytest.approx(tuned["valid_loss"] - base["valid_loss"])
    events = _events(client, job["id"])
    (ev,) = [e for e in events if e["data"] and "evaluation" in e["data"]]
    assert ev["data"]["evaluation"] == report and ev["message"].startswith("Evaluation on ")
    (cl,) = [e for e in events if e["data"] and e["data"].get("file") == "training"]
    assert cl["data"]["cleaning"]["removed"]["exact_duplicates"] >= 4  # the 4 repeats (+ any of its own)
    assert cl["data"]["cleaning"]["scrubbed"]["email"] == 1
    assert job["config"]["cleaning"]["dedupe"] is True


def test_report_failure_does_not_fail_the_job(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import ml.evaluation as ev

    def broken(recipe: Any, validation_file: str | None) -> Any:
        raise RuntimeError("no memory left")

    monkeypatch.setattr(ev, "build_report", broken)
    job = train(client, ds.sentiment_rows(16), "classification", "freeze", 1e-2,
                validation_file=upload(client, ds.sentiment_rows(8, seed=2), "v.jsonl"))
    assert job["status"] == "succeeded" and job["evaluation"] is None
    warn = [e for e in _events(client, job["id"]) if e["level"] == "warn"]
    assert [e["message"] for e in warn] == ["Evaluation report skipped: RuntimeError: no memory left"]


def test_no_validation_file_no_report(client: TestClient) -> None:
    job = train(client, ds.sentiment_rows(16), "classification", "freeze", 1e-2)
    assert job["evaluation"] is None


def test_estimate_matches_what_the_job_trained(client: TestClient) -> None:
    body = job_body(upload(client, chat_rows(30)), "causal_lm", "lora", 2e-2,
                    validation_file=upload(client, chat_rows(8, seed=3), "v.jsonl"))
    est = client.post("/v1/fine_tuning/estimate", json=body).json()
    created = client.post("/v1/fine_tuning/jobs", json=body).json()
    assert created["estimated_finish"] is not None
    from app.jobs.runner import run_job

    assert run_job(created["id"], "w") == "succeeded"
    job = client.get(f"/v1/fine_tuning/jobs/{created['id']}").json()
    assert job["trained_tokens"] == est["trained_tokens"]
    assert job["progress"]["step"] == est["steps"]
    speeds = [e["data"]["tokens_per_second"] for e in _events(client, job["id"])
              if e["type"] == "metrics" and "tokens_per_second" in (e["data"] or {})]
    again = client.post("/v1/fine_tuning/estimate", json=body).json()  # now measured from this job
    assert again["basis"] == "measured"
    assert again["tokens_per_second"] == pytest.approx(sum(speeds) / len(speeds), rel=1e-3)
