"""Inference fixtures: one engine for the session (models stay warm across tests), artifacts
built once, and the app with the inference router mounted."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from app.inference.local import LocalInference, make_engine
from app.inference.router import router as inference_router
from app.main import create_app
from app.settings import get_settings
from ml.inference.engine import Engine, EngineConfig
from tests.inference import artifacts


@dataclass(frozen=True)
class Artifacts:
    cls_a: str
    cls_b: str
    cls_c: str
    cls_prompt: str
    regression: str
    mlm: str
    lm_lora: str
    lm_lora_b: str
    lm_prompt: str
    lm_full: str


@pytest.fixture(scope="session")
def arts() -> Artifacts:
    return Artifacts(
        cls_a=artifacts.lora_classifier(1), cls_b=artifacts.lora_classifier(2),
        cls_c=artifacts.lora_classifier(12),
        cls_prompt=artifacts.prompt_classifier(3), regression=artifacts.lora_classifier(4, task="regression"),
        mlm=artifacts.lora_masked_lm(5), lm_lora=artifacts.lora_causal(6), lm_lora_b=artifacts.lora_causal(7),
        lm_prompt=artifacts.prompt_causal(8), lm_full=artifacts.full_causal(9),
    )


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    eng = make_engine(get_settings(), EngineConfig(max_batch_size=16, max_wait_ms=2.0, max_adapters=16,
                                                   max_bases=4, max_full_models=2, max_input_tokens=64,
                                                   max_new_tokens=32))
    yield eng
    eng.close()


@pytest.fixture
def app(session_factory: sessionmaker[Session], engine: Engine) -> FastAPI:
    application = create_app()
    if not any(getattr(r, "path", "") == "/v1/chat/completions" for r in application.routes):
        application.include_router(inference_router, prefix="/v1")
    application.state.sessionmaker = session_factory
    application.state.inference = LocalInference(engine, get_settings().inference_timeout_seconds)
    return application
