"""Where inference runs: in this process (an engine created lazily on `app.state`) or, when
`settings.inference_url` is set, in the inference worker behind that URL."""

from __future__ import annotations

import threading

from fastapi import FastAPI

from app.inference.engine import Engine
from app.inference.remote import RemoteInference
from app.inference.service import Inference, LocalInference
from app.settings import get_settings

_lock = threading.Lock()
_process_engine: Engine | None = None


def get_engine(app: FastAPI) -> Engine:
    """The in-process engine on `app.state`, created on first use. One per process: apps made
    later in the same process (tests, reloads) share it, so models load once."""
    global _process_engine
    engine: Engine | None = getattr(app.state, "inference_engine", None)
    if engine is None:
        with _lock:
            if _process_engine is None:
                _process_engine = Engine()
            engine = app.state.inference_engine = _process_engine
    return engine


def inference_url() -> str:
    """`settings.inference_url` (read defensively until the setting exists everywhere)."""
    return str(getattr(get_settings(), "inference_url", "") or "")


def get_inference(app: FastAPI) -> Inference:
    settings = get_settings()
    url = inference_url()
    if url:
        return RemoteInference(url, settings.inference_timeout_seconds)
    return LocalInference(get_engine(app), settings.inference_timeout_seconds)


async def evict_model(app: FastAPI, storage_key: str) -> None:
    """Call after deleting a model: drops its weights wherever inference runs."""
    await get_inference(app).evict(storage_key)


def shutdown_engine(app: FastAPI) -> None:
    """For the app's lifespan shutdown: stops the engine's threads and frees its models."""
    global _process_engine
    engine: Engine | None = getattr(app.state, "inference_engine", None)
    if engine is not None:
        engine.close()
        app.state.inference_engine = None
        with _lock:
            if _process_engine is engine:
                _process_engine = None
