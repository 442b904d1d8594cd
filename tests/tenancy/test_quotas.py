"""Quotas checked at job creation and upload: waiting jobs and stored bytes answer 429 `quota_exceeded`
(OpenAI's status for an exhausted quota, with `x-should-retry: false`), a file over the project's
size limit 413."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.jobs.state import JobStatus
from app.kit import ids
from app.orm import Job, Project
from app.tenancy import service
from tests.jobs.factories import make_file

Client = tuple[TestClient, Project]
CHAT = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


def _upload(client: TestClient, data: bytes) -> Any:
    return client.post("/v1/files", files={"file": ("train.jsonl", io.BytesIO(data))}, data={"purpose": "fine-tune"})


def _queued_job(db: Session, project: Project, status: str = JobStatus.queued) -> Job:
    f = make_file(db, project)
    job = Job(id=ids.job_id(), project_id=project.id, model="tiny-lm", training_file=f.id, seed=0, task="causal_lm",
              training_type={"type": "lora"}, hyperparameters={}, config={}, status=status)
    db.add(job)
    db.flush()
    return job


def _quota_error(r: Any) -> dict[str, Any]:
    assert r.status_code == 429, r.text
    assert r.headers["x-should-retry"] == "false"
    err: dict[str, Any] = r.json()["error"]
    assert (err["type"], err["code"]) == ("insufficient_quota", "quota_exceeded")
    return err


def test_queued_jobs_quota(project_client: Client, db: Session, set_limits: Callable[..., None]) -> None:
    client, project = project_client
    set_limits(project, max_queued_jobs=2)
    _queued_job(db, project)
    _queued_job(db, project, status=JobStatus.running)  # running jobs are not waiting: not counted
    train = make_file(db, project, "chat", rows=40).id
    db.commit()
    body = {"model": "tiny-lm", "training_file": train}
    assert client.post("/v1/fine_tuning/jobs", json=body).status_code == 200
    err = _quota_error(client.post("/v1/fine_tuning/jobs", json=body))
    assert "already has 2 queued fine-tuning jobs and may have at most 2" in err["message"]
    set_limits(project, max_queued_jobs=None)  # back to the default (unlimited)
    assert client.post("/v1/fine_tuning/jobs", json=body).status_code == 200


def test_queued_jobs_quota_from_settings(project_client: Client, db: Session,
                                         settings: Callable[..., object]) -> None:
    _, project = project_client
    settings(max_queued_jobs=1)
    _queued_job(db, project)
    db.commit()
    with pytest.raises(service.QuotaExceeded):
        service.check_job_quota(db, project)


def test_storage_quota(project_client: Client, set_limits: Callable[..., None]) -> None:
    client, project = project_client
    set_limits(project, max_storage_bytes=len(CHAT) * 3)
    first = _upload(client, CHAT * 2)
    assert first.status_code == 200, first.text
    err = _quota_error(_upload(client, CHAT * 2))
    assert err["param"] == "file"
    assert f"stores {len(CHAT) * 2} bytes of its {len(CHAT) * 3}-byte storage quota" in err["message"]
    assert _upload(client, CHAT).status_code == 200  # exactly fills the quota
    _quota_error(client.post(f"/v1/files/{first.json()['id']}/clean", json={}))  # a cleaned copy counts too
    assert client.delete(f"/v1/files/{first.json()['id']}").status_code == 200  # deleting frees room
    assert _upload(client, CHAT * 2).status_code == 200


def test_max_file_size_413(project_client: Client, set_limits: Callable[..., None],
                           settings: Callable[..., object]) -> None:
    client, project = project_client
    set_limits(project, max_file_bytes=len(CHAT) * 2)
    assert _upload(client, CHAT * 2).status_code == 200
    r = _upload(client, CHAT * 3)
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("file_too_large", "file")
    assert f"limited to {len(CHAT) * 2} bytes" in err["message"]
    # The project's limit may be above the server default: it replaces it.
    settings(max_upload_bytes=len(CHAT))
    assert _upload(client, CHAT * 2).status_code == 200
    set_limits(project, max_file_bytes=None)
    assert _upload(client, CHAT * 2).status_code == 413


def test_limits_view(project_client: Client, set_limits: Callable[..., None],
                     settings: Callable[..., object]) -> None:
    _, project = project_client
    settings(rate_limit_rpm=60, max_storage_bytes=10_000, max_running_jobs_per_project=2)
    set_limits(project, max_queued_jobs=4, max_running_jobs=1)
    out = service.limits(project)
    assert (out.rpm, out.max_queued_jobs, out.max_running_jobs, out.max_storage_bytes) == (60, 4, 1, 10_000)
    assert out.overrides == {"max_queued_jobs": 4, "max_running_jobs": 1}


def test_running_jobs_limit_for_the_claim(project_client: Client, db: Session, set_limits: Callable[..., None],
                                          settings: Callable[..., object]) -> None:
    _, project = project_client
    assert service.running_jobs_limit(db, project.id) is None
    settings(max_running_jobs_per_project=3)
    assert service.running_jobs_limit(db, project.id) == 3
    set_limits(project, max_running_jobs=1)
    assert service.running_jobs_limit(db, project.id) == 1
    set_limits(project, max_running_jobs=0)
    assert service.running_jobs_limit(db, project.id) is None
