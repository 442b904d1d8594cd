"""Split mode: with an inference URL set, the API resolves the model itself and forwards the
resolved request to a real `worker/inference_server.py` (uvicorn on a free port), which takes only
calls bearing the shared internal token."""

from __future__ import annotations

import json
import os
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

TOKEN = "internal-secret-for-tests"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def worker_url(engine: Engine) -> Iterator[str]:
    port = _free_port()
    app = inference_server.create_app(engine, internal_token=TOKEN)
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
    monkeypatch.setattr(get_settings(), "internal_token", TOKEN)
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
    stats = httpx.get(f"{remote}/internal/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert arts.lm_lora in stats["adapters"]


def test_internal_calls_need_the_shared_token(remote: str) -> None:
    body = {"ref": {}, "request": {}}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Bearer"}):
        for method, path in (("GET", "/stats"), ("POST", "/predictions"), ("POST", "/evict")):
            r = httpx.request(method, f"{remote}/internal/v1{path}", headers=headers, json=body)
            assert r.status_code == 401, (headers, path, r.text)
            assert r.json()["error"]["code"] == "invalid_internal_token"
    assert httpx.get(f"{remote}/healthz").status_code == 200  # the container healthcheck needs no token


def test_the_predictions_fast_path_answers_like_the_routes(remote: str, engine: Engine, arts: Artifacts) -> None:
    """`POST /internal/v1/predictions` skips FastAPI's stack (`FastPredictions`): the engine's own results,
    and the OpenAI error shape for a body that is not JSON, a forwarded request the models refuse, the
    library's input errors and the worker's own checks."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    url = f"{remote}/internal/v1/predictions"
    ref = {"name": "ft:cls", "storage_key": arts.cls_a, "task": "classification"}
    ok = httpx.post(url, headers=auth, json={"ref": ref, "request": {"model": "ft:cls", "input": ["good", "bad"]}})
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
    data = ok.json()
    assert data["model"] == "ft:cls" and [d["index"] for d in data["data"]] == [0, 1]
    assert all(d["label"] in LABELS for d in data["data"]) and data["usage"]["prompt_tokens"] > 0

    def error(body: bytes | dict[str, object]) -> tuple[int, dict[str, object]]:
        r = httpx.post(url, headers=auth, **({"content": body} if isinstance(body, bytes) else {"json": body}))
        return r.status_code, r.json()["error"]

    status, err = error(b"{not json")
    assert status == 400 and err["type"] == "invalid_request_error" and "forwarded request" in str(err["message"])
    status, err = error({"ref": ref, "request": {"model": "ft:cls", "input": []}})
    assert (status, err["param"]) == (400, "input")
    status, err = error({"ref": ref, "request": {"model": "ft:cls", "input": "x", "top_k": "many"}})
    assert status == 400 and err["type"] == "invalid_request_error"
    status, err = error({"ref": ref | {"task": "causal_lm"}, "request": {"model": "ft:cls", "input": "x"}})
    assert status == 400 and err["code"] == "unsupported_task"
    long = {"ref": ref, "request": {"model": "ft:cls", "input": "word " * 5000}}
    status, err = error(long)
    assert (status, err["code"]) == (400, "input_too_long")
    assert httpx.post(url, headers=auth, json={"ref": ref}).status_code == 400  # no request at all
    assert httpx.get(url, headers=auth).status_code == 404  # other methods fall through to the routes


def test_a_worker_without_a_token_refuses_everything(engine: Engine) -> None:
    app = inference_server.create_app(engine, internal_token="")
    with TestClient(app) as c:
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer x"}):
            assert c.get("/internal/v1/stats", headers=headers).status_code == 401


def test_a_wrong_token_on_the_api_side_is_a_503_for_the_user(
        remote: str, monkeypatch: pytest.MonkeyPatch, project_client: tuple[TestClient, Project], db: Session,
        arts: Artifacts) -> None:
    client, project = project_client
    cls, _ = register(db, project, arts.cls_a, task="classification", base=ENCODER, labels=LABELS)
    db.commit()
    monkeypatch.setattr(get_settings(), "internal_token", "not-the-workers")
    r = client.post("/v1/predictions", json={"model": cls, "input": "good"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "inference_unavailable"
    assert "TUNEHOUSE_INTERNAL_TOKEN" in r.json()["error"]["message"]


def test_the_worker_will_not_start_without_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "internal_token", "")
    with pytest.raises(SystemExit) as exc:
        inference_server.main(["--port", "1"])
    assert exc.value.code == 2


def test_embedded_mode_gives_its_inference_worker_a_fresh_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.server import embedded_children
    from app.settings import Settings

    monkeypatch.delenv("TUNEHOUSE_INFERENCE_URL", raising=False)
    monkeypatch.delenv("TUNEHOUSE_INTERNAL_TOKEN", raising=False)
    first, second = Settings(inference_url="", internal_token=""), Settings(inference_url="", internal_token="")
    assert any("worker.inference_server" in cmd for cmd in embedded_children(first))
    token = os.environ["TUNEHOUSE_INTERNAL_TOKEN"]  # what the supervised children inherit
    assert first.internal_token == token and len(token) >= 32
    embedded_children(second)
    assert second.internal_token != token  # one per start, never a built-in default
    kept = Settings(inference_url="", internal_token="configured")
    embedded_children(kept)
    assert kept.internal_token == "configured"
