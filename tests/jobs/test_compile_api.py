"""The `compile` job field: `auto` by default, stored on the job's recipe config, validated."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.models_registry.catalog import local_base
from app.orm import Job
from ml.config import RecipeConfig
from tests.e2e.data import chat_rows
from tests.jobs.realdb import job_body, upload

JOBS = "/v1/fine_tuning/jobs"


@pytest.fixture
def body(client: TestClient) -> dict[str, Any]:
    local_base("tiny-lm")
    return job_body(upload(client, chat_rows(12)), "causal_lm", "lora", 1e-3)


@pytest.mark.parametrize(("given", "stored"), [(None, "auto"), (True, True), (False, False), ("auto", "auto")])
def test_compile_reaches_the_recipe_config(given: Any, stored: Any, client: TestClient, db: Session,
                                           body: dict[str, Any]) -> None:
    r = client.post(JOBS, json=body if given is None else {**body, "compile": given})
    assert r.status_code == 200, r.text
    job = db.get(Job, r.json()["id"])
    assert job is not None and RecipeConfig.model_validate(job.config).compile == stored


def test_compile_rejects_other_values(client: TestClient, body: dict[str, Any]) -> None:
    r = client.post(JOBS, json={**body, "compile": "max-autotune"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "compile"
