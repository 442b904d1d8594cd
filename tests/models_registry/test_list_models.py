"""GET /v1/models: OpenAI's one-response list by default, keyset pages of fine-tuned models with `limit`."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.jobs.state import JobStatus
from app.kit import ids
from app.kit.db import utcnow
from app.models_registry.catalog import load_catalog
from app.orm import FineTunedModel, Job, Project
from tests.jobs.factories import make_file


def _models(db: Session, project: Project, n: int) -> list[str]:
    f, now, names = make_file(db, project), utcnow(), []
    for i in range(n):
        job = Job(id=ids.job_id(), project_id=project.id, model="tiny-lm", training_file=f.id, seed=0,
                  task="causal_lm", training_type={"type": "lora"}, hyperparameters={}, config={},
                  status=JobStatus.succeeded)
        db.add(job)
        db.flush()
        names.append(f"ft:tiny-lm:{project.name}::{job.id}")
        db.add(FineTunedModel(id=names[-1], project_id=project.id, job_id=job.id, base_model="tiny-lm",
                              task="causal_lm", training_type="lora", storage_key=f"jobs/{job.id}/final-1",
                              created_at=now + timedelta(seconds=i // 2)))  # pairs tie on created_at
    db.commit()
    return names


def test_pages_walk_every_model_once_newest_first(project_client: tuple[TestClient, Project], db: Session) -> None:
    client, project = project_client
    names = _models(db, project, 7)
    everything = client.get("/v1/models").json()
    assert everything["has_more"] is False
    n_base = len(load_catalog())
    assert sorted(m["id"] for m in everything["data"][n_base:]) == sorted(names)
    seen: list[str] = []
    after: str | None = None
    while True:
        r = client.get("/v1/models", params={"limit": 3, **({"after": after} if after else {})})
        assert r.status_code == 200, r.text
        body = r.json()
        tuned = [m["id"] for m in body["data"] if m["id"].startswith("ft:")]
        assert len(body["data"]) - len(tuned) == (0 if after else n_base)  # base models: first page only
        seen += tuned
        if not body["has_more"]:
            break
        after = body["last_id"]
    assert sorted(seen) == sorted(names) and len(seen) == len(set(seen))


def test_bad_page_arguments_are_400(client: TestClient) -> None:
    assert client.get("/v1/models", params={"limit": 0}).json()["error"]["param"] == "limit"
    r = client.get("/v1/models", params={"limit": 5, "after": "ft:nope"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "after"
