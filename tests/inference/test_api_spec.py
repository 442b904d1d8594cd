"""Inference responses (chat, legacy completions, predictions, a 404) validate against the schemas the
OpenAPI document gives for their status."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.orm import Project
from tests.inference.artifacts import DECODER, ENCODER, LABELS, register
from tests.inference.conftest import Artifacts
from tests.spec_check import check_response


def test_inference_responses_match_the_document(app: FastAPI, project_client: tuple[TestClient, Project],
                                                db: Session, arts: Artifacts) -> None:
    client, project = project_client
    lm, _ = register(db, project, arts.lm_lora, task="causal_lm", base=DECODER, training_type="lora")
    cls, _ = register(db, project, arts.cls_a, task="classification", base=ENCODER, training_type="lora",
                      labels=LABELS)
    db.commit()
    spec = app.openapi()
    chat = {"model": lm, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    check_response(spec, "POST", "/v1/chat/completions", client.post("/v1/chat/completions", json=chat), 200)
    completion = {"model": lm, "prompt": ["once upon", "the"], "max_tokens": 3}
    check_response(spec, "POST", "/v1/completions", client.post("/v1/completions", json=completion), 200)
    predict = {"model": cls, "input": ["great movie", "awful"]}
    check_response(spec, "POST", "/v1/predictions", client.post("/v1/predictions", json=predict), 200)
    missing = client.post("/v1/chat/completions", json={**chat, "model": "ft:nope"})
    check_response(spec, "POST", "/v1/chat/completions", missing, 404)
