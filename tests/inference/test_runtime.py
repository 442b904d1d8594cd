"""Where inference runs: an inference worker behind a URL, never the API process itself."""

from __future__ import annotations

import pytest
from fastapi import FastAPI

from app.inference import runtime
from app.inference.remote import RemoteInference
from app.kit.errors import ServiceUnavailable
from app.settings import get_settings


def test_the_api_never_runs_an_engine_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "inference_url", "")
    with pytest.raises(ServiceUnavailable, match="TUNEHOUSE_INFERENCE_URL"):
        runtime.get_inference(FastAPI())


def test_an_injected_inference_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    app = FastAPI()
    app.state.inference = marker = object()
    assert runtime.get_inference(app) is marker


def test_inference_url_selects_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "inference_url", "http://worker:8001")
    inference = runtime.get_inference(FastAPI())
    assert isinstance(inference, RemoteInference) and inference.base_url == "http://worker:8001"
