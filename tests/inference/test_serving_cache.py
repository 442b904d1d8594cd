"""The serving hot path: API key -> project and model resolution cached (no database round trip once
warm), invalidated by deleting a model or revoking a key -- in this process and from another one
(through the Redis generation) -- and served counts metered in memory, written in batches."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.auth.deps import KEYS
from app.auth.service import create_api_key, get_or_create_project
from app.inference.router import MODELS
from app.inference.schemas import PredictionList, PredictionRequest, Usage
from app.kit.db import session_scope
from app.main import create_app
from app.orm import ApiKey, FineTunedModel, Job, Project, ProjectUsage
from app.settings import get_settings
from app.tenancy.service import METER
from ml.inference.types import ModelRef
from tests.jobs.factories import make_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeInference:
    """Answers /v1/predictions without a model (the cache lives in the API, before inference)."""

    def __init__(self) -> None:
        self.evicted: list[str] = []

    async def predictions(self, ref: ModelRef, req: PredictionRequest) -> PredictionList:
        data: list[dict[str, Any]] = [{"index": i, "label": "pos", "score": 0.9} for i, _ in enumerate(req.inputs())]
        return PredictionList(model=ref.name, data=data, usage=Usage(prompt_tokens=2 * len(data),
                                                                     total_tokens=2 * len(data)))

    async def evict(self, storage_key: str) -> None:
        self.evicted.append(storage_key)


def _model(db: Session, project: Project) -> str:
    f = make_file(db, project)
    job = Job(id=f"ftjob-{uuid.uuid4().hex[:12]}", project_id=project.id, model="minilm-l6", training_file=f.id,
              seed=0, task="classification", training_type={"type": "lora"}, hyperparameters={}, config={},
              status="succeeded")
    db.add(job)
    db.flush()
    name = f"ft:minilm-l6:{project.name}:t:{job.id}"
    db.add(FineTunedModel(id=name, project_id=project.id, job_id=job.id, base_model="minilm-l6",
                          task="classification", training_type="lora", storage_key=f"jobs/{job.id}/final"))
    db.commit()
    return name


def _predict(client: TestClient, model: str) -> Any:
    return client.post("/v1/predictions", json={"model": model, "input": ["good", "bad"]})


def test_warm_requests_skip_the_database_and_a_deleted_model_404s_at_once(
        app: FastAPI, project_client: tuple[TestClient, Project], db: Session) -> None:
    client, project = project_client
    app.state.inference = fake = FakeInference()
    name = _model(db, project)
    assert _predict(client, name).status_code == 200  # reads the key and the model, caches both
    keys, models = KEYS.hits, MODELS.hits
    assert _predict(client, name).status_code == 200
    assert (KEYS.hits, MODELS.hits) == (keys + 1, models + 1)  # both from the cache: no database read
    assert client.delete(f"/v1/models/{name}").status_code == 200
    r = _predict(client, name)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert fake.evicted  # the delete freed the weights


def test_served_counts_are_written_in_batches_not_per_request(
        app: FastAPI, project_client: tuple[TestClient, Project], db: Session) -> None:
    client, project = project_client
    app.state.inference = FakeInference()
    name = _model(db, project)
    METER.flush_into(db)  # whatever earlier tests left pending
    db.commit()
    for _ in range(3):
        assert _predict(client, name).status_code == 200
    assert db.get(ProjectUsage, project.id) is None  # no write on the request path
    METER.flush_into(db)  # what the flusher task (every second), usage reads and shutdown do
    db.commit()
    row = db.get(ProjectUsage, project.id)
    assert row is not None and (row.predictions, row.tokens_served) == (6, 12)


@pytest.mark.skipif(not get_settings().broker_url.startswith("redis"), reason="needs the Redis generation")
def test_a_key_revoked_by_another_process_is_refused_at_once(committed_db: sessionmaker[Session]) -> None:
    """The API caches the key; a separate process (the operator CLI) revokes it: the next request is a 401."""
    with session_scope(committed_db) as s:
        project = get_or_create_project(s, f"revoke-{uuid.uuid4().hex[:8]}")
        key = create_api_key(s, project, "cli")
        name = _model(s, project)
        key_id = s.query(ApiKey.id).filter(ApiKey.project_id == project.id).scalar()
    app = create_app()
    app.state.sessionmaker = committed_db
    app.state.inference = FakeInference()
    client = TestClient(app, headers={"Authorization": f"Bearer {key}"})
    assert _predict(client, name).status_code == 200
    hits = KEYS.hits
    assert _predict(client, name).status_code == 200
    assert KEYS.hits == hits + 1  # cached
    revoke = ("from app.auth.service import revoke_key\nfrom app.kit.db import session_scope\n"
              f"with session_scope() as s:\n    assert revoke_key(s, {key_id!r}) == 1\n")
    subprocess.run([sys.executable, "-c", revoke], cwd=ROOT, env=os.environ.copy(), check=True, timeout=120)
    r = _predict(client, name)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
