"""Request ids: the caller's `X-Request-ID` when it is short and safe to echo and log, else a new one;
sent back as `x-request-id` (as OpenAI does) and put on every log record of the request."""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.kit.logging import log_context

HEADER = "x-request-id"
_SAFE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_from(value: str | None) -> str:
    """The incoming id if it is safe (no spaces, quotes or control characters a log or a header
    would carry), else a fresh one: a bad id is replaced, never an error."""
    if value is not None and _SAFE.fullmatch(value):
        return value
    return f"req_{uuid.uuid4().hex}"


class RequestIdMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware), so streaming responses pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v for k, v in scope["headers"] if k == HEADER.encode()), None)
        request_id = request_id_from(incoming.decode("latin-1") if incoming is not None else None)
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        with log_context(request_id=request_id):
            await self.app(scope, receive, send_with_id)
