"""Where inference runs: always in an inference worker process (`worker/inference_server.py`) behind
`settings.inference_url`; the API process never imports torch. `tunehouse serve` in embedded mode
starts and supervises one and sets the URL. Tests may put an in-process `Inference` on
`app.state.inference` instead."""

from __future__ import annotations

from fastapi import FastAPI

from app.inference.remote import RemoteInference
from app.inference.service import Inference
from app.kit.errors import ServiceUnavailable
from app.settings import get_settings


def get_inference(app: FastAPI) -> Inference:
    injected: Inference | None = getattr(app.state, "inference", None)
    if injected is not None:
        return injected
    settings = get_settings()
    if not settings.inference_url:
        raise ServiceUnavailable("No inference worker is configured: set TUNEHOUSE_INFERENCE_URL "
                                 "(`tunehouse serve` starts one itself in embedded mode).",
                                 code="inference_unavailable")
    return RemoteInference(settings.inference_url, settings.inference_timeout_seconds)


async def evict_model(app: FastAPI, storage_key: str) -> None:
    """Call after deleting a model: drops its weights wherever inference runs."""
    try:
        inference = get_inference(app)
    except ServiceUnavailable:
        return  # nothing is loaded anywhere
    await inference.evict(storage_key)
