"""The inference worker: the same engine as embedded mode, behind a small internal HTTP API.

    python -m worker.inference_server --host 0.0.0.0 --port 8001

The API (with `TUNEHOUSE_INFERENCE_URL=http://host:8001`) resolves models against the database
and forwards `{"ref": <resolved model>, "request": <OpenAI body>}` here; this process never
touches the database, only the artifact storage (the same `artifact_url`). Its /internal API takes only
calls bearing the shared secret `TUNEHOUSE_INTERNAL_TOKEN` (compared in constant time); without one set
it refuses them all, and `main` will not start."""

from __future__ import annotations

import argparse
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from app.inference.local import LocalInference, make_engine
from app.inference.remote import INTERNAL_PREFIX, EvictRequest, ForwardRequest
from app.inference.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    PredictionRequest,
)
from app.kit.errors import AuthenticationError, InvalidRequest, as_tunehouse_error, install_error_handlers
from app.kit.logging import configure_logging, log_config
from app.settings import get_settings
from ml.errors import MLError
from ml.inference.engine import Engine
from ml.runtime import configure_threads

M = TypeVar("M", bound=BaseModel)
PREDICTIONS_PATH = f"{INTERNAL_PREFIX}/predictions"
log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def check_token(expected: str, authorization: str) -> None:
    scheme, _, token = authorization.partition(" ")
    if not expected or scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        raise AuthenticationError("Internal calls need 'Authorization: Bearer <TUNEHOUSE_INTERNAL_TOKEN>'.",
                                  code="invalid_internal_token")


async def require_internal_token(request: Request) -> None:  # async: a sync dependency costs a thread hop
    check_token(request.app.state.internal_token, request.headers.get("authorization", ""))


class FastPredictions:
    """`POST /internal/v1/predictions`, the hot path of classifier serving, as a plain ASGI handler in
    front of FastAPI. Its stack (middleware, routing, dependencies, body validation) cost this process's
    event loop more than the call's own work, and that loop shares the GIL with the model thread: at 32
    clients the API reached 0.70x of the in-process engine. The same token check, body models and
    error shape as the routes behind it."""

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PREDICTIONS_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        status, body, extra = await self._answer(scope, receive)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   *((k.lower().encode(), v.encode()) for k, v in extra.items())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, scope: Scope, receive: Receive) -> tuple[int, bytes, dict[str, str]]:
        try:
            authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
            check_token(self.state.internal_token, authorization)
            body = _parse(ForwardRequest, await _body(receive))
            svc: LocalInference = self.state.inference
            result = await svc.predictions(body.ref, _parse(PredictionRequest, body.request))
            return 200, result.model_dump_json().encode(), {}
        except Exception as exc:
            err = as_tunehouse_error(exc, "The server had an error processing your request.")
            if err is not exc and not isinstance(exc, MLError):
                log.exception("unhandled error", exc_info=exc)
            return err.status_code, json.dumps(err.body()).encode(), dict(err.headers or {})


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidRequest("The client went away before sending the whole request.")
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def create_app(engine: Engine | None = None, internal_token: str | None = None) -> FastAPI:
    settings = get_settings()
    configure_logging(settings)
    configure_threads(settings.torch_threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        app.state.inference.engine.close()

    app = FastAPI(title="tunehouse inference worker", lifespan=lifespan)
    app.state.inference = LocalInference(engine or make_engine(settings), settings.inference_timeout_seconds)
    app.state.internal_token = settings.internal_token if internal_token is None else internal_token
    install_error_handlers(app)
    _routes(app)
    app.add_middleware(FastPredictions, state=app.state)
    return app


def _parse(model: type[M], data: dict[str, Any] | bytes) -> M:
    try:
        return model.model_validate_json(data) if isinstance(data, bytes) else model.model_validate(data)
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

    internal = APIRouter(prefix=INTERNAL_PREFIX, dependencies=[Depends(require_internal_token)])
    _internal_routes(internal)
    app.include_router(internal)


def _internal_routes(router: APIRouter) -> None:
    @router.get("/stats")
    def stats(request: Request) -> dict[str, Any]:
        return _svc(request).engine.stats()

    @router.post("/chat/completions", response_model=None)
    async def chat(body: ForwardRequest, request: Request) -> ChatCompletion | StreamingResponse:
        req = _parse(ChatCompletionRequest, body.request)
        if req.stream:
            return _sse(await _svc(request).open_chat_stream(body.ref, req))
        return await _svc(request).chat(body.ref, req)

    @router.post("/completions", response_model=None)
    async def completions(body: ForwardRequest, request: Request) -> Completion | StreamingResponse:
        req = _parse(CompletionRequest, body.request)
        if req.stream:
            return _sse(await _svc(request).open_completion_stream(body.ref, req))
        return await _svc(request).completion(body.ref, req)

    @router.post("/evict")
    async def evict(body: EvictRequest, request: Request) -> dict[str, str]:
        await _svc(request).evict(body.storage_key)
        return {"status": "ok"}


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="tunehouse inference worker")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    # Off by default: the API logs each request (with its request id); a line per forwarded call here
    # cost ~10% of this process's event loop, which shares the GIL with the model thread.
    parser.add_argument("--access-log", action="store_true", help="log every internal call")
    args = parser.parse_args(argv)
    if not get_settings().internal_token:
        parser.error("TUNEHOUSE_INTERNAL_TOKEN is not set: the API and this worker need the same shared secret")
    uvicorn.run(create_app(), host=args.host, port=args.port, log_config=log_config(get_settings()),
                access_log=args.access_log)


if __name__ == "__main__":
    main()
