"""Where inference runs: a lazily created in-process engine, or the worker when a URL is set."""

from __future__ import annotations

import pytest
from fastapi import FastAPI

from app.inference import runtime
from app.inference.remote import RemoteInference
from app.inference.service import LocalInference


def test_in_process_engine_is_created_lazily_and_shared() -> None:
    first, second = FastAPI(), FastAPI()
    assert getattr(first.state, "inference_engine", None) is None
    engine = runtime.get_engine(first)
    try:
        assert first.state.inference_engine is engine and runtime.get_engine(second) is engine
        assert isinstance(runtime.get_inference(first), LocalInference)
    finally:
        runtime.shutdown_engine(first)
    assert first.state.inference_engine is None
    later = FastAPI()
    assert runtime.get_engine(later) is not engine  # a fresh one after shutdown
    runtime.shutdown_engine(later)
    runtime.shutdown_engine(FastAPI())  # nothing there: a no-op


def test_inference_url_selects_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "inference_url", lambda: "http://worker:8001")
    inference = runtime.get_inference(FastAPI())
    assert isinstance(inference, RemoteInference) and inference.base_url == "http://worker:8001"
