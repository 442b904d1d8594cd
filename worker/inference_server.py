"""The inference worker: the same engine as embedded mode, behind a small internal HTTP API.

    python -m worker.inference_server --host 0.0.0.0 --port 8001

The API (with `TUNEHOUSE_INFERENCE_URL=http://host:8001`) resolves models against the database
and forwards `{"ref": <resolved model>, "request": <OpenAI body>}` here; this process never
touches the database, only the artifact storage (the same `artifact_url`)."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from app.inference.local import LocalInference, make_engine
from app.inference.remote import INTERNAL_PREFIX, EvictRequest, ForwardRequest
from app.inference.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    PredictionList,
    PredictionRequest,
)
from app.kit.errors import InvalidRequest, install_error_handlers
from app.kit.logging import configure_logging
from app.settings import get_settings
from ml.inference.engine import Engine
from ml.runtime import configure_threads

M = TypeVar("M", bound=BaseModel)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(engine: Engine | None = None) -> FastAPI:
    settings = get_settings()
    configure_logging(settings)
    configure_threads(settings.torch_threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        app.state.inference.engine.close()

    app = FastAPI(title="tunehouse inference worker", lifespan=lifespan)
    app.state.inference = LocalInference(engine or make_engine(settings), settings.inference_timeout_seconds)
    install_error_handlers(app)
    _routes(app)
    return app


def _parse(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(f"Invalid forwarded request: {exc.errors()[0].get('msg')}") from exc


def _svc(request: Request) -> LocalInference:
    return request.app.state.inference  # type: ignore[no-any-return]


def _sse(stream: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)


def _routes(app: FastAPI) -> None:
    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(f"{INTERNAL_PREFIX}/stats")
    def stats(request: Request) -> dict[str, Any]:
        return _svc(request).engine.stats()

    @app.post(f"{INTERNAL_PREFIX}/chat/completions", response_model=None)
    async def chat(body: ForwardRequest, request: Request) -> ChatCompletion | StreamingResponse:
        req = _parse(ChatCompletionRequest, body.request)
        if req.stream:
            return _sse(await _svc(request).open_chat_stream(body.ref, req))
        return await _svc(request).chat(body.ref, req)

    @app.post(f"{INTERNAL_PREFIX}/completions", response_model=None)
    async def completions(body: ForwardRequest, request: Request) -> Completion | StreamingResponse:
        req = _parse(CompletionRequest, body.request)
        if req.stream:
            return _sse(await _svc(request).open_completion_stream(body.ref, req))
        return await _svc(request).completion(body.ref, req)

    @app.post(f"{INTERNAL_PREFIX}/predictions")
    async def predictions(body: ForwardRequest, request: Request) -> PredictionList:
        return await _svc(request).predictions(body.ref, _parse(PredictionRequest, body.request))

    @app.post(f"{INTERNAL_PREFIX}/evict")
    async def evict(body: EvictRequest, request: Request) -> dict[str, str]:
        await _svc(request).evict(body.storage_key)
        return {"status": "ok"}


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="tunehouse inference worker")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(), host=args.host, port=args.port, log_config=None)


if __name__ == "__main__":
    main()
