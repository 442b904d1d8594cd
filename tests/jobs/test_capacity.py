"""Capacity-aware claims: a worker claims only jobs whose devices per node it holds, so a job too big for
it neither runs there nor blocks the smaller jobs queued behind it; and `resources.nodes` on creation."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.jobs.lease import claim_next
from app.kit.db import utcnow
from app.orm import Job, Project
from app.settings import get_settings
from tests.conftest import USING_REDIS
from tests.jobs.factories import make_file
from tests.jobs.worker_factories import committed_job

T0 = utcnow() - timedelta(hours=1)


def _job(factory: sessionmaker[Session], seconds: int, devices: int, project: str = "capacity") -> str:
    at = T0 + timedelta(seconds=seconds)
    return committed_job(factory, project_name=project, created_at=at, enqueued_at=at, devices=devices)


def test_a_small_worker_skips_a_big_job_and_takes_the_one_behind_it(committed_db: sessionmaker[Session]) -> None:
    big = _job(committed_db, 0, devices=2)
    small = _job(committed_db, 1, devices=1)
    later_big = _job(committed_db, 2, devices=4, project="capacity-other")

    got = claim_next("one-device-worker", devices=1)
    assert got is not None and got.job_id == small
    assert claim_next("another-one-device-worker", devices=1) is None  # only jobs it cannot hold are left
    got = claim_next("two-device-worker", devices=2)
    assert got is not None and got.job_id == big
    with committed_db() as s:
        assert s.get(Job, later_big).status == "queued"  # type: ignore[union-attr]
        assert s.get(Job, small).devices == 1  # type: ignore[union-attr]


def test_the_setting_is_the_workers_capacity(committed_db: sessionmaker[Session],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    big = _job(committed_db, 0, devices=2)
    monkeypatch.setattr(get_settings(), "worker_devices", 1)
    assert claim_next("w1") is None
    monkeypatch.setattr(get_settings(), "worker_devices", 2)
    got = claim_next("w2")
    assert got is not None and got.job_id == big


@pytest.mark.skipif(not USING_REDIS, reason="embedded mode (no Redis) refuses nodes > 1")
def test_nodes_are_accepted_up_to_the_limit_and_stored(client: TestClient, db: Session,
                                                      project_client: tuple[TestClient, Project],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "max_nodes", 4)
    chat_file = make_file(db, project_client[1], "chat", rows=40).id
    body = {"model": "tiny-lm", "training_file": chat_file, "resources": {"devices": 2, "nodes": 4}}
    r = client.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["resources"] == {"devices": 2, "nodes": 4, "strategy": "auto"}
    job = db.get(Job, r.json()["id"])
    assert job is not None and (job.devices, job.nodes) == (2, 4)

    r = client.post("/v1/fine_tuning/jobs", json={**body, "resources": {"nodes": 5}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "resources.nodes"
    r = client.post("/v1/fine_tuning/jobs", json={**body, "resources": {"nodes": 2}, "training_type": "qlora"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "resources.devices"
