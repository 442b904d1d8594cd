"""The API's way to inference: the resolved request goes to an inference worker
(`worker/inference_server.py`, supervised by `tunehouse serve` in embedded mode), whose errors and
SSE streams are relayed unchanged. The API process never loads a model itself. Every call carries the
shared secret `TUNEHOUSE_INTERNAL_TOKEN` as a bearer token; the worker refuses calls without it."""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from app.inference import wire
from app.inference.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    PredictionList,
    PredictionRequest,
)
from app.kit.errors import GatewayTimeout, ServiceUnavailable, TunehouseError
from app.settings import get_settings
from ml.inference.types import ModelRef

INTERNAL_PREFIX = "/internal/v1"
# Keep-alive below uvicorn's 5 s default: never reuse a connection the worker is closing.
POOL = httpx.Limits(max_connections=1000, max_keepalive_connections=256, keepalive_expiry=4.0)
_CLIENTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str, float | None], httpx.AsyncClient]]
_CLIENTS = weakref.WeakKeyDictionary()
M = TypeVar("M", bound=BaseModel)


class ForwardRequest(BaseModel):
    """What the API sends the worker: the resolved model (dir key, not a DB row) + the body."""

    ref: ModelRef
    request: dict[str, Any]


class EvictRequest(BaseModel):
    storage_key: str


def upstream_error(status: int, body: bytes) -> TunehouseError:
    if status in (401, 403):  # the worker refused our internal token: the operator's to fix, not the user's
        return ServiceUnavailable("The inference worker refused this API's internal token: "
                                  "TUNEHOUSE_INTERNAL_TOKEN must be the same on both.", code="inference_unavailable")
    try:
        err = json.loads(body)["error"]
        exc = TunehouseError(str(err.get("message", "")), param=err.get("param"), code=err.get("code"))
        exc.type = str(err.get("type") or "server_error")
    except (ValueError, KeyError, TypeError, AttributeError):
        exc = TunehouseError(f"The inference worker answered {status}.")
    exc.status_code = status
    return exc


class RemoteInference:
    def __init__(self, base_url: str, timeout_s: float, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = httpx.Timeout(timeout_s + 5.0, connect=5.0)
        self.token = get_settings().internal_token if token is None else token

    def _client(self) -> httpx.AsyncClient:
        """This event loop's client for the worker: its connections stay open between calls (a new
        client per call paid a TCP connect and an SSL context per request). An AsyncClient is bound to
        the loop it first ran on, hence one per loop."""
        clients = _CLIENTS.setdefault(asyncio.get_running_loop(), {})
        key = (self.base_url, self.token, self.timeout.read)
        client = clients.get(key)
        if client is None or client.is_closed:
            client = clients[key] = httpx.AsyncClient(
                base_url=self.base_url + INTERNAL_PREFIX, timeout=self.timeout, limits=POOL,
                headers={"Authorization": f"Bearer {self.token}"})
        return client

    async def chat(self, ref: ModelRef, req: ChatCompletionRequest) -> ChatCompletion:
        return await self._call("/chat/completions", ref, req, ChatCompletion)

    async def open_chat_stream(self, ref: ModelRef, req: ChatCompletionRequest) -> AsyncIterator[str]:
        return await self._open_stream("/chat/completions", ref, req)

    async def completion(self, ref: ModelRef, req: CompletionRequest) -> Completion:
        return await self._call("/completions", ref, req, Completion)

    async def open_completion_stream(self, ref: ModelRef, req: CompletionRequest) -> AsyncIterator[str]:
        return await self._open_stream("/completions", ref, req)

    async def predictions(self, ref: ModelRef, req: PredictionRequest) -> PredictionList:
        return await self._call("/predictions", ref, req, PredictionList)

    async def evict(self, storage_key: str) -> None:
        await _send(self._client(), "POST", "/evict", EvictRequest(storage_key=storage_key).model_dump())

    async def _call(self, path: str, ref: ModelRef, req: BaseModel, out: type[M]) -> M:
        pool = wire.pool_for(self.base_url + INTERNAL_PREFIX, {"Authorization": f"Bearer {self.token}"})
        if pool is None:  # https: httpx
            resp = await _send(self._client(), "POST", path, _payload(ref, req))
            return out.model_validate_json(resp.content)
        body = ForwardRequest(ref=ref, request=req.model_dump(mode="json", exclude_unset=True)).model_dump_json()
        try:
            async with asyncio.timeout(self.timeout.read):
                status, content = await pool.post(path, body.encode())
        except TimeoutError as exc:
            raise GatewayTimeout("The inference worker did not answer in time.") from exc
        except OSError as exc:  # refused, reset, closed early (wire.WireError)
            raise _unreachable(exc) from exc
        if status != 200:
            raise upstream_error(status, content)
        return out.model_validate_json(content)

    async def _open_stream(self, path: str, ref: ModelRef, req: BaseModel) -> AsyncIterator[str]:
        client = self._client()
        try:
            resp = await client.send(client.build_request("POST", path, json=_payload(ref, req)), stream=True)
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from exc
        if resp.status_code != 200:
            body = await resp.aread()
            await resp.aclose()
            raise upstream_error(resp.status_code, body)
        return _relay(resp)


async def _relay(resp: httpx.Response) -> AsyncIterator[str]:
    try:
        async for text in resp.aiter_text():
            yield text
    finally:
        await resp.aclose()


async def _send(client: httpx.AsyncClient, method: str, path: str, payload: dict[str, Any]) -> httpx.Response:
    try:
        resp = await client.request(method, path, json=payload)
    except httpx.TimeoutException as exc:
        raise GatewayTimeout("The inference worker did not answer in time.") from exc
    except httpx.HTTPError as exc:
        raise _unreachable(exc) from exc
    if resp.status_code != 200:
        raise upstream_error(resp.status_code, resp.content)
    return resp


def _payload(ref: ModelRef, req: BaseModel) -> dict[str, Any]:
    body = req.model_dump(mode="json", exclude_unset=True)
    return ForwardRequest(ref=ref, request=body).model_dump(mode="json")


def _unreachable(exc: Exception) -> ServiceUnavailable:
    return ServiceUnavailable(f"The inference worker is unreachable ({type(exc).__name__}).",
                              code="inference_unavailable")
