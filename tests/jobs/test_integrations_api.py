"""OpenAI's `integrations` (wandb...) are refused with a clear 400, never silently dropped."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.orm import Project
from tests.jobs.factories import make_file


def test_integrations_are_refused(db: Session, project_client: tuple[TestClient, Project]) -> None:
    client, project = project_client
    body = {"model": "tiny-lm", "training_file": make_file(db, project, "chat", rows=40).id,
            "integrations": [{"type": "wandb", "wandb": {"project": "my-project"}}]}
    for path in ("/v1/fine_tuning/jobs", "/v1/fine_tuning/estimate"):
        r = client.post(path, json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert (error["param"], error["code"]) == ("integrations", "unsupported_integration")
        assert "wandb" in error["message"]
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []
    assert client.post("/v1/fine_tuning/jobs", json={**body, "integrations": []}).status_code == 200
