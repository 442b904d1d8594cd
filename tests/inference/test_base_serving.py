"""Catalog base models served as themselves: chat and completions on a base causal LM (through the same
engine as fine-tuned models, sharing the base copy its LoRA adapters load onto), metered like any model;
base classifiers / encoders and a server with TUNEHOUSE_SERVE_BASE_MODELS off answer 400
`model_not_servable`."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.orm import Project, ProjectUsage
from app.settings import get_settings
from app.tenancy.service import METER
from ml.inference.engine import Engine
from tests.inference.artifacts import DECODER, ENCODER, register
from tests.inference.conftest import Artifacts
from tests.inference.test_remote import remote, worker_url  # noqa: F401 (fixtures: the split mode)

Client = tuple[TestClient, Project]
CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4, "temperature": 0}


def _refused(resp: Any) -> str:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert (err["code"], err["param"]) == ("model_not_servable", "model")
    return str(err["message"])


def test_base_causal_lm_chats_and_is_metered(project_client: Client, other_client: TestClient, db: Session,
                                             engine: Engine) -> None:
    client, project = project_client
    METER.flush_into(db)  # whatever earlier tests left pending
    db.commit()
    out = client.post("/v1/chat/completions", json={"model": DECODER, **CHAT})
    assert out.status_code == 200, out.text
    body = out.json()
    assert body["model"] == DECODER and body["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < body["usage"]["completion_tokens"] <= 4 and body["usage"]["prompt_tokens"] > 0
    assert f"{DECODER}/causal_lm/0" in engine.stats()["bases"]  # the base cache, not a full-model copy
    assert f"base:{DECODER}" not in engine.stats()["full_models"]
    # the legacy endpoint too, and any project may use a public base model
    legacy = other_client.post("/v1/completions", json={"model": DECODER, "prompt": "once upon", "max_tokens": 3})
    assert legacy.status_code == 200 and legacy.json()["choices"][0]["text"] is not None
    METER.flush_into(db)
    db.commit()
    row = db.get(ProjectUsage, project.id)
    assert row is not None and row.predictions == 1 and row.tokens_served == body["usage"]["total_tokens"]


def test_base_shares_weights_with_its_lora_models(project_client: Client, db: Session, arts: Artifacts,
                                                  engine: Engine) -> None:
    """Base and fine-tuned side by side (the console playground): one copy of the base in memory."""
    client, project = project_client
    name, _ = register(db, project, arts.lm_lora, task="causal_lm", base=DECODER, training_type="lora")
    db.commit()
    loads = engine.cache.stats.base_loads
    for model in (DECODER, name, DECODER):
        assert client.post("/v1/chat/completions", json={"model": model, **CHAT}).status_code == 200
    assert engine.cache.stats.base_loads - loads <= 1  # at most the first load, if nothing had it warm
    base = f"{DECODER}/causal_lm/0"
    assert engine.stats()["bases"].count(base) == 1


def test_base_chat_streams_through_the_inference_worker(remote: str, project_client: Client) -> None:  # noqa: F811
    """As in production: the API resolves the base id, the worker maps `base:<id>` to the catalog dir."""
    client, _ = project_client
    body = {"model": DECODER, **CHAT}
    plain = client.post("/v1/chat/completions", json=body)
    assert plain.status_code == 200, plain.text
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
        lines = [x.removeprefix("data: ") for x in resp.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    streamed = "".join(json.loads(x)["choices"][0]["delta"].get("content", "") for x in lines[:-1])
    assert streamed == plain.json()["choices"][0]["message"]["content"]


def test_base_classifiers_and_encoders_are_refused(project_client: Client) -> None:
    client, _ = project_client
    for model in (ENCODER, DECODER):  # an encoder base; a causal LM asked for predictions
        msg = _refused(client.post("/v1/predictions", json={"model": model, "input": ["fine"]}))
        assert model in msg and "untrained" in msg
    _refused(client.post("/v1/chat/completions", json={"model": ENCODER, **CHAT}))


def test_base_serving_can_be_turned_off(project_client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    client, _ = project_client
    monkeypatch.setattr(get_settings(), "serve_base_models", False)
    msg = _refused(client.post("/v1/chat/completions", json={"model": DECODER, **CHAT}))
    assert "TUNEHOUSE_SERVE_BASE_MODELS" in msg
    assert client.get(f"/v1/models/{DECODER}").status_code == 200  # still listed: it can be fine-tuned
