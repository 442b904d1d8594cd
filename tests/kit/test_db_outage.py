"""While the database is unreachable the API answers 503 with Retry-After in the OpenAI error shape,
never a 500: the app here is bound to a Postgres URL on a port where nothing listens."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import sessionmaker

from app.kit.db import make_engine
from app.main import create_app
from tests.e2e.conftest import free_port


@pytest.fixture
def down_client() -> TestClient:
    engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/tunehouse")
    app = create_app()
    app.state.sessionmaker = sessionmaker(bind=engine, expire_on_commit=False)
    return TestClient(app, headers={"Authorization": "Bearer th-some-key"})


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/v1/files", None),
    ("GET", "/v1/fine_tuning/jobs/ftjob-x", None),
    ("POST", "/v1/fine_tuning/jobs", {"model": "tiny-lm", "training_file": "file-x"}),
    ("GET", "/v1/models", None),
])
def test_a_database_outage_is_a_503_with_retry_after(down_client: TestClient, method: str, path: str,
                                                    body: dict[str, str] | None) -> None:
    r = down_client.request(method, path, json=body)
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) > 0
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("server_error", "database_unavailable")
    assert set(err) == {"message", "type", "param", "code"} and "psycopg" not in err["message"]


def test_liveness_does_not_need_the_database(down_client: TestClient) -> None:
    assert down_client.get("/healthz").status_code == 200
