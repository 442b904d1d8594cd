"""Split mode: with an inference URL set, the API resolves the model itself and forwards the
resolved request to a real `worker/inference_server.py` (uvicorn on a free port)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.orm import Project
from app.settings import get_settings
from ml.inference.engine import Engine
from tests.inference.artifacts import DECODER, ENCODER, LABELS, register
from tests.inference.conftest import Artifacts
from worker import inference_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def worker_url(engine: Engine) -> Iterator[str]:
    port = _free_port()
    app = inference_server.create_app(engine)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(timeout=5)


@pytest.fixture
def remote(monkeypatch: pytest.MonkeyPatch, worker_url: str, app: FastAPI) -> str:
    """The API as it runs in production: no engine of its own, requests forwarded to the worker."""
    monkeypatch.setattr(get_settings(), "inference_url", worker_url)
    app.state.inference = None
    return worker_url


def test_predictions_and_chat_through_the_worker(remote: str, project_client: tuple[TestClient, Project],
                                                 db: Session, arts: Artifacts) -> None:
    client, project = project_client
    cls, _ = register(db, project, arts.cls_a, task="classification", base=ENCODER, labels=LABELS)
    lm, _ = register(db, project, arts.lm_lora, task="causal_lm", base=DECODER)
    db.commit()
    out = client.post("/v1/predictions", json={"model": cls, "input": ["good", "bad"]})
    assert out.status_code == 200, out.text
    assert [d["label"] in LABELS for d in out.json()["data"]] == [True, True]
    body = {"model": lm, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
    plain = client.post("/v1/chat/completions", json=body).json()
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
        lines = [x.removeprefix("data: ") for x in resp.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    streamed = "".join(json.loads(x)["choices"][0]["delta"].get("content", "") for x in lines[:-1])
    assert streamed == plain["choices"][0]["message"]["content"]


def test_worker_errors_are_relayed_and_resolution_stays_in_the_api(
        remote: str, project_client: tuple[TestClient, Project], db: Session, arts: Artifacts) -> None:
    client, project = project_client
    lm, _ = register(db, project, arts.lm_lora, task="causal_lm", base=DECODER)
    db.commit()
    messages = [{"role": "user", "content": "word " * 100}]
    resp = client.post("/v1/chat/completions",
                       json={"model": lm, "max_tokens": 5, "stream": True, "messages": messages})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "input_too_long"
    resp = client.post("/v1/predictions", json={"model": "ft:x:y:z:ftjob-none", "input": "x"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    stats = httpx.get(f"{remote}/internal/v1/stats").json()
    assert arts.lm_lora in stats["adapters"]
