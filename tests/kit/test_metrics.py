"""Prometheus /metrics: latency by route template, jobs by status, queue depth, tokens/s, CPU; only for
the operator token (off without one, unless made public)."""

from __future__ import annotations

import re
import uuid

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.jobs.events import add_event
from app.kit import ids
from app.kit.metrics import install_metrics
from app.orm import Job, Project
from app.settings import get_settings
from tests.jobs.factories import make_file

OPERATOR = "operator-secret-for-tests"


@pytest.fixture
def metrics_client(app: FastAPI, client: TestClient, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setattr(get_settings(), "operator_token", OPERATOR)
    monkeypatch.setattr(get_settings(), "metrics_public", False)
    install_metrics(app)
    return client


def _job(db: Session, project: Project, status: str, **kw: object) -> Job:
    f = make_file(db, project)
    job = Job(id=ids.job_id(), project_id=project.id, model="tiny-lm", training_file=f.id, seed=1,
              task="causal_lm", training_type={"type": "lora"}, hyperparameters={}, config={},
              status=status, **kw)
    db.add(job)
    db.flush()
    return job


def _sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def _scrape(c: TestClient) -> str:
    r = c.get("/metrics", headers={"Authorization": f"Bearer {OPERATOR}"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


def test_latency_histogram_by_route_template(metrics_client: TestClient) -> None:
    job_id = f"ftjob-{uuid.uuid4().hex}"
    metrics_client.get(f"/v1/fine_tuning/jobs/{job_id}")  # 404
    metrics_client.get("/healthz")
    text = _scrape(metrics_client)
    route = "/v1/fine_tuning/jobs/{job_id}"
    assert (_sample(text, "tunehouse_http_request_duration_seconds_count", route=route, status="404",
                    method="GET") or 0) >= 1
    assert (_sample(text, "tunehouse_http_request_duration_seconds_count", route="/healthz", status="200")
            or 0) >= 1
    assert job_id not in text  # raw paths never become labels


def test_unmatched_paths_share_one_label(metrics_client: TestClient) -> None:
    metrics_client.get(f"/no/such/{uuid.uuid4().hex}")
    text = _scrape(metrics_client)
    assert (_sample(text, "tunehouse_http_request_duration_seconds_count", route="unmatched",
                    status="404") or 0) >= 1


def test_jobs_by_status_and_tokens_per_second(metrics_client: TestClient, db: Session,
                                              project_client: tuple[TestClient, Project]) -> None:
    project = project_client[1]
    before = _scrape(metrics_client)
    running = _job(db, project, "running")
    _job(db, project, "queued")
    _job(db, project, "queued")
    add_event(db, running.id, "Step 1", type="metrics", data={"step": 1, "train_loss": 2.0,
                                                              "tokens_per_second": 1234.5})
    add_event(db, running.id, "Checkpoint saved", data={"step": 1})
    db.commit()
    text = _scrape(metrics_client)
    for status, added in (("queued", 2), ("running", 1), ("failed", 0)):
        assert _sample(text, "tunehouse_jobs", status=status) == \
            (_sample(before, "tunehouse_jobs", status=status) or 0) + added
    assert _sample(text, "tunehouse_training_tokens_per_second", job_id=running.id, model="tiny-lm") == 1234.5


def test_tokens_per_second_from_progress_and_finished_jobs_drop_out(
        metrics_client: TestClient, db: Session, project_client: tuple[TestClient, Project]) -> None:
    job = _job(db, project_client[1], "running", progress={"step": 3, "tokens_per_second": 99.0})
    db.commit()
    assert _sample(_scrape(metrics_client), "tunehouse_training_tokens_per_second", job_id=job.id) == 99.0
    job.status = "succeeded"
    db.commit()
    assert _sample(_scrape(metrics_client), "tunehouse_training_tokens_per_second", job_id=job.id) is None


def test_process_cpu_is_exported(metrics_client: TestClient) -> None:
    text = _scrape(metrics_client)
    assert _sample(text, "process_cpu_seconds_total") is not None
    assert _sample(text, "tunehouse_metrics_scrape_errors") == 0


def test_queue_depth(metrics_client: TestClient) -> None:
    settings = get_settings()
    if settings.embedded:
        assert "tunehouse_queue_depth{" not in _scrape(metrics_client)
        return
    import redis

    r = redis.Redis.from_url(settings.broker_url)
    marker = f"metrics-test-{uuid.uuid4().hex}"
    base = _sample(_scrape(metrics_client), "tunehouse_queue_depth", queue="default") or 0
    r.rpush("default", marker, marker)
    try:
        depth = _sample(_scrape(metrics_client), "tunehouse_queue_depth", queue="default")
    finally:
        r.lrem("default", 0, marker)
    assert depth is not None and depth >= base + 2


def test_metrics_need_the_operator_token(metrics_client: TestClient) -> None:
    """An API key (any project's) is not enough: the counts span every project."""
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": OPERATOR}):
        r = metrics_client.get("/metrics", headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_operator_token"
        assert r.headers["www-authenticate"] == "Bearer"
    assert metrics_client.get("/metrics").status_code == 401  # the client's own API key


def test_metrics_are_off_without_a_token_unless_public(metrics_client: TestClient,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "operator_token", "")
    r = metrics_client.get("/metrics", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    monkeypatch.setattr(get_settings(), "metrics_public", True)
    r = metrics_client.get("/metrics", headers={"Authorization": ""})
    assert r.status_code == 200 and "tunehouse_jobs" in r.text
