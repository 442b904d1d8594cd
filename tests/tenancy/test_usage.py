"""Usage accounting: predictions and tokens served, stored bytes, device-seconds and trained tokens per
project, atomic under concurrent writers; the operator endpoint and its token."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.auth.service import get_or_create_project
from app.inference.schemas import PredictionList, PredictionRequest, Usage
from app.jobs.state import JobStatus
from app.kit import ids
from app.orm import FineTunedModel, Job, Project, ProjectUsage
from app.tenancy import service
from ml.inference.types import ModelRef
from tests.jobs.factories import make_file

Client = tuple[TestClient, Project]
CHAT = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
TOKEN = "op-secret-token"


class FakeInference:
    """Answers /v1/predictions without a model: 3 tokens per input."""

    async def predictions(self, ref: ModelRef, req: PredictionRequest) -> PredictionList:
        data: list[dict[str, Any]] = [{"index": i, "label": "pos", "score": 0.9} for i, _ in enumerate(req.inputs())]
        return PredictionList(model=ref.name, data=data,
                              usage=Usage(prompt_tokens=3 * len(data), total_tokens=3 * len(data)))


def _model(db: Session, project: Project) -> str:
    f = make_file(db, project)
    job = Job(id=ids.job_id(), project_id=project.id, model="minilm-l6", training_file=f.id, seed=0,
              task="classification", training_type={"type": "lora"}, hyperparameters={}, config={},
              status=JobStatus.succeeded)
    db.add(job)
    db.flush()
    name = f"ft:minilm-l6:{project.name}:t:{job.id}"
    db.add(FineTunedModel(id=name, project_id=project.id, job_id=job.id, base_model="minilm-l6",
                          task="classification", training_type="lora", storage_key=f"jobs/{job.id}/final-1"))
    db.commit()
    return name


def _operator(app: FastAPI, project: str, token: str | None = TOKEN) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return TestClient(app).get(f"/v1/operator/projects/{project}/usage", headers=headers)


def test_predictions_and_uploads_are_metered(app: FastAPI, project_client: Client, db: Session,
                                             settings: Callable[..., object]) -> None:
    client, project = project_client
    settings(operator_token=TOKEN)
    app.state.inference = FakeInference()
    model = _model(db, project)
    before = _operator(app, project.id).json()
    assert (before["predictions"], before["tokens_served"]) == (0, 0)
    for inputs in (["good", "bad"], ["fine"]):
        r = client.post("/v1/predictions", json={"model": model, "input": inputs})
        assert r.status_code == 200, r.text
    assert client.post("/v1/files", files={"file": ("t.jsonl", io.BytesIO(CHAT * 2))},
                       data={"purpose": "fine-tune"}).status_code == 200
    after = _operator(app, project.name).json()  # by name as well as by id
    assert (after["predictions"], after["tokens_served"]) == (3, 9)
    assert after["stored_bytes"] == before["stored_bytes"] + len(CHAT) * 2
    assert after["object"] == "project.usage" and after["limits"]["max_file_bytes"] > 0


def test_a_failed_prediction_is_not_counted(app: FastAPI, project_client: Client, db: Session) -> None:
    client, project = project_client
    app.state.inference = FakeInference()
    r = client.post("/v1/predictions", json={"model": "ft:minilm-l6:x:t:ftjob-nope", "input": "hi"})
    assert r.status_code == 404
    assert db.get(ProjectUsage, project.id) is None


def test_operator_endpoint_needs_the_operator_token(app: FastAPI, project_client: Client,
                                                    settings: Callable[..., object]) -> None:
    client, project = project_client
    r = _operator(app, project.id)  # no operator token configured: the endpoints are off
    assert r.status_code == 403 and r.json()["error"]["code"] == "operator_disabled"
    settings(operator_token=TOKEN)
    for token in (None, "wrong", client.api_key):  # type: ignore[attr-defined]
        r = _operator(app, project.id, token)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_operator_token", token
    assert _operator(app, project.id).status_code == 200
    assert _operator(app, "no-such-project").json()["error"]["code"] == "project_not_found"


def test_counters_are_atomic_under_concurrency(committed_db: sessionmaker[Session]) -> None:
    with committed_db() as s:
        project_id = get_or_create_project(s, "usage-race").id
        s.commit()

    def bump() -> None:
        for _ in range(20):
            with committed_db() as s:
                service.add_usage(s, project_id, predictions=1, tokens_served=5)
                s.commit()

    threads = [threading.Thread(target=bump) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with committed_db() as s:
        row = s.get(ProjectUsage, project_id)
        assert row is not None and (row.predictions, row.tokens_served) == (120, 600)


def test_an_attempt_records_device_seconds(committed_db: sessionmaker[Session]) -> None:
    with committed_db() as s:
        project = get_or_create_project(s, "usage-attempt")
        f = make_file(s, project)
        job = Job(id=ids.job_id(), project_id=project.id, model="tiny-lm", training_file=f.id, seed=0,
                  task="causal_lm", training_type={"type": "lora"}, hyperparameters={}, config={},
                  status=JobStatus.running)
        s.add(job)
        s.commit()
        job_id, project_id = job.id, project.id
    try:
        with service.metered_attempt(job_id):
            raise RuntimeError("the attempt failed")  # recorded however it ends
    except RuntimeError:
        pass
    with committed_db() as s:
        service.add_usage(s, project_id, trained_tokens=1234)
        s.commit()
        row = s.get(ProjectUsage, project_id)
        assert row is not None and row.device_seconds > 0 and row.trained_tokens == 1234
