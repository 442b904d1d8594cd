"""The HTTP surface in embedded mode: OpenAI client for chat (plain and streamed), raw SSE,
legacy completions, /v1/predictions for every predictive task, and the 404/409/400 paths."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.kit.db import utcnow
from app.kit.hotcache import bump_after_commit
from app.orm import FineTunedModel, Project
from ml.inference.engine import Engine
from tests.inference import artifacts
from tests.inference.artifacts import DECODER, ENCODER, LABELS, register
from tests.inference.conftest import Artifacts

Client = tuple[TestClient, Project]


def _model(db: Session, project: Project, key: str, task: str, training_type: str = "lora", **kw: Any) -> str:
    base = DECODER if task == "causal_lm" else ENCODER
    name, _ = register(db, project, key, task=task, base=base, training_type=training_type, **kw)
    db.commit()
    return name


def _oa(client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=client.api_key,  # type: ignore[attr-defined]
                         http_client=client, max_retries=0)


def _sse(resp: Any) -> list[Any]:
    events = [line.removeprefix("data: ") for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _error(resp: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code
    return err  # type: ignore[no-any-return]


# --- chat / completions ---

def test_chat_with_openai_client(project_client: Client, db: Session, arts: Artifacts) -> None:
    client, project = project_client
    name = _model(db, project, arts.lm_lora, "causal_lm")
    out = _oa(client).chat.completions.create(
        model=name, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=5, temperature=0, n=2)
    assert out.object == "chat.completion" and out.model == name and len(out.choices) == 2
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason in ("stop", "length")
    assert out.choices[0].message.content == out.choices[1].message.content  # greedy
    assert out.usage is not None and out.usage.prompt_tokens > 0
    assert out.usage.completion_tokens <= 10
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_stream_with_openai_client(project_client: Client, db: Session, arts: Artifacts) -> None:
    client, project = project_client
    name = _model(db, project, arts.lm_lora, "causal_lm")
    kwargs: dict[str, Any] = {"model": name, "messages": [{"role": "user", "content": "tell me a story"}],
                              "max_completion_tokens": 8, "temperature": 0}
    whole = _oa(client).chat.completions.create(**kwargs)
    chunks = list(_oa(client).chat.completions.create(**kwargs, stream=True,
                                                      stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_raw_sse_and_seeded_sampling(project_client: Client, db: Session, arts: Artifacts) -> None:
    client, project = project_client
    name = _model(db, project, arts.lm_lora_b, "causal_lm")
    body = {"model": name, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6,
            "temperature": 1.3, "top_p": 0.9, "seed": 42, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        chunks = _sse(resp)
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    plain = client.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert plain["choices"][0]["message"]["content"] == streamed  # same seed, same tokens


def test_completions_list_prompt_n(project_client: Client, db: Session, arts: Artifacts) -> None:
    client, project = project_client
    name = _model(db, project, arts.lm_lora, "causal_lm")
    body = {"model": name, "prompt": ["once upon", "the weather"], "n": 2, "max_tokens": 3, "seed": 7,
            "stop": ["\n\n"]}
    first = client.post("/v1/completions", json=body)
    assert first.status_code == 200, first.text
    out = first.json()
    assert out["object"] == "text_completion" and [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["usage"]["completion_tokens"] <= 12
    assert client.post("/v1/completions", json=body).json()["choices"] == out["choices"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        chunks = _sse(resp)
    assert {c["object"] for c in chunks} == {"text_completion"}
    texts = ["".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i)
             for i in range(4)]
    assert texts == [c["text"] for c in out["choices"]]


@pytest.mark.parametrize("kind", ["lm_full", "lm_prompt"])
def test_full_and_prompt_tuned_models_chat(kind: str, project_client: Client, db: Session,
                                           arts: Artifacts) -> None:
    client, project = project_client
    training_type = "full" if kind == "lm_full" else "prompt_tuning"
    name = _model(db, project, getattr(arts, kind), "causal_lm", training_type)
    out = _oa(client).chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}],
                                              max_tokens=4)
    assert out.choices[0].finish_reason in ("stop", "length")


# --- predictions ---

def test_classification_predictions(project_client: Client, db: Session, arts: Artifacts) -> None:
    client, project = project_client
    name = _model(db, project, arts.cls_a, "classification", labels=LABELS)
    resp = client.post("/v1/predictions", json={"model": name, "input": ["great movie", "awful", "meh"]})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["object"] == "list" and out["model"] == name and [d["index"] for d in out["data"]] == [0, 1, 2]
    for d in out["data"]:
        assert set(d["scores"]) == set(LABELS) and d["label"] in LABELS
        assert abs(sum(d["scores"].values()) - 1) < 1e-5 and d["score"] == max(d["scores"].values())
    assert out["usage"]["prompt_tokens"] > 0
    single = client.post("/v1/predictions", json={"model": name, "input": "great movie"}).json()
    assert single["data"][0]["label"] == out["data"][0]["label"]


def test_regression_predictions(project_client: Client, db: Session, arts: Artifacts) -> None:
    client, project = project_client
    name = _model(db, project, arts.regression, "regression")
    out = client.post("/v1/predictions", json={"model": name, "input": ["a", "b c"]}).json()
    assert [set(d) for d in out["data"]] == [{"index", "value"}] * 2
    assert all(isinstance(d["value"], float) for d in out["data"])


def test_masked_lm_predictions(project_client: Client, db: Session, arts: Artifacts, engine: Engine) -> None:
    client, project = project_client
    name = _model(db, project, arts.mlm, "masked_lm")
    inputs = ["paris is the [MASK] of france", "[MASK] and [MASK]"]
    out = client.post("/v1/predictions", json={"model": name, "top_k": 3, "input": inputs})
    assert out.status_code == 200, out.text
    data = out.json()["data"]
    assert len(data[0]["fills"]) == 1 and len(data[1]["fills"]) == 2
    top = data[0]["fills"][0]
    assert len(top) == 3 and {"token", "token_str", "score"} <= set(top[0])
    assert top[0]["score"] >= top[1]["score"] >= top[2]["score"]
    assert not engine.cache.adapters.items[arts.mlm].mixable  # its MLM transform is not a plain layer
    err = _error(client.post("/v1/predictions", json={"model": name, "input": ["ok [MASK]", "no mask"]}),
                 400, "missing_mask")
    assert "Input 1" in err["message"]


# --- resolution: checkpoints, 404, 409, deleted ---

def test_checkpoints_are_servable(project_client: Client, db: Session, arts: Artifacts) -> None:
    client, project = project_client
    _, job = register(db, project, arts.cls_b, task="classification", base=ENCODER, with_model=False)
    ckpt = artifacts.add_checkpoint(db, project, job, arts.cls_b)
    db.commit()
    for model in (ckpt.id, ckpt.fine_tuned_model_checkpoint):
        resp = client.post("/v1/predictions", json={"model": model, "input": "hello"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == model and resp.json()["data"][0]["label"] in LABELS


def test_unknown_and_foreign_models_are_404(project_client: Client, other_client: TestClient, db: Session,
                                            arts: Artifacts) -> None:
    client, project = project_client
    name = _model(db, project, arts.cls_a, "classification")
    for model in ("ft:nope:x:y:ftjob-missing", "whatever"):  # base ids: test_base_serving.py
        resp = client.post("/v1/predictions", json={"model": model, "input": "x"})
        err = _error(resp, 404, "model_not_found")
        assert err["param"] == "model"
    _error(other_client.post("/v1/predictions", json={"model": name, "input": "x"}), 404, "model_not_found")
    with pytest.raises(openai.NotFoundError):
        _oa(other_client).chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}])


def test_deleted_model_stops_serving_and_is_evicted(project_client: Client, db: Session,
                                                    engine: Engine) -> None:
    client, project = project_client
    key = artifacts.lora_classifier(11)
    name = _model(db, project, key, "classification")
    assert client.post("/v1/predictions", json={"model": name, "input": "x"}).status_code == 200
    assert key in engine.cache.adapters
    row = db.get(FineTunedModel, name)
    assert row is not None
    row.deleted_at = utcnow()
    bump_after_commit(db)  # as app.models_registry.service.delete_model does: resolutions are cached
    db.commit()
    _error(client.post("/v1/predictions", json={"model": name, "input": "x"}), 404, "model_not_found")
    assert key not in engine.cache.adapters


def test_model_of_unfinished_job_is_409(project_client: Client, db: Session, arts: Artifacts) -> None:
    client, project = project_client
    name = _model(db, project, arts.lm_lora, "causal_lm", status="running", with_model=False)
    err = _error(client.post("/v1/chat/completions", json={"model": name, "messages": [
        {"role": "user", "content": "x"}]}), 409, "model_not_ready")
    assert "running" in err["message"] and err["param"] == "model"


# --- 400s ---

def test_wrong_endpoint_for_task(project_client: Client, db: Session, arts: Artifacts) -> None:
    client, project = project_client
    cls = _model(db, project, arts.cls_a, "classification")
    lm = _model(db, project, arts.lm_lora, "causal_lm")
    err = _error(client.post("/v1/chat/completions", json={"model": cls, "messages": [
        {"role": "user", "content": "x"}]}), 400, "unsupported_task")
    assert "classification" in err["message"]
    err = _error(client.post("/v1/completions", json={"model": cls, "prompt": "x"}), 400, "unsupported_task")
    err = _error(client.post("/v1/predictions", json={"model": lm, "input": "x"}), 400, "unsupported_task")
    assert "causal_lm" in err["message"]


def test_limits(project_client: Client, db: Session, arts: Artifacts) -> None:
    client, project = project_client
    cls = _model(db, project, arts.cls_a, "classification")
    lm = _model(db, project, arts.lm_lora, "causal_lm")
    long = "word " * 100  # the test engine allows 64 input tokens
    err = _error(client.post("/v1/predictions", json={"model": cls, "input": ["short", long]}), 400,
                 "input_too_long")
    assert "Input 1" in err["message"] and "64" in err["message"]
    resp = client.post("/v1/completions", json={"model": lm, "prompt": ["ok", long]})
    err = _error(resp, 400, "input_too_long")
    assert "Input 1" in err["message"]
    err = _error(client.post("/v1/chat/completions", json={"model": lm, "max_tokens": 33, "messages": [
        {"role": "user", "content": "x"}]}), 400, "max_tokens_too_large")
    assert "32" in err["message"] and err["param"] == "max_tokens"
    with client.stream("POST", "/v1/chat/completions", json={"model": lm, "stream": True, "messages": [
            {"role": "user", "content": long}]}) as resp:
        assert resp.status_code == 400  # validated before the stream starts
    _error(client.post("/v1/chat/completions", json={"model": lm, "messages": []}), 400, "invalid_value")
    with pytest.raises(openai.BadRequestError):
        _oa(client).chat.completions.create(model=lm, messages=[{"role": "user", "content": "x"}],
                                            max_tokens=99)
