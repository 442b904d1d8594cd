"""The API's way to inference: the resolved request goes to an inference worker
(`worker/inference_server.py`, supervised by `tunehouse serve` in embedded mode), whose errors and
SSE streams are relayed unchanged. The API process never loads a model itself."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from app.inference.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    PredictionList,
    PredictionRequest,
)
from app.kit.errors import GatewayTimeout, ServiceUnavailable, TunehouseError
from ml.inference.types import ModelRef

INTERNAL_PREFIX = "/internal/v1"
M = TypeVar("M", bound=BaseModel)


class ForwardRequest(BaseModel):
    """What the API sends the worker: the resolved model (dir key, not a DB row) + the body."""

    ref: ModelRef
    request: dict[str, Any]


class EvictRequest(BaseModel):
    storage_key: str


def upstream_error(status: int, body: bytes) -> TunehouseError:
    try:
        err = json.loads(body)["error"]
        exc = TunehouseError(str(err.get("message", "")), param=err.get("param"), code=err.get("code"))
        exc.type = str(err.get("type") or "server_error")
    except (ValueError, KeyError, TypeError, AttributeError):
        exc = TunehouseError(f"The inference worker answered {status}.")
    exc.status_code = status
    return exc


class RemoteInference:
    def __init__(self, base_url: str, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = httpx.Timeout(timeout_s + 5.0, connect=5.0)

    def _client(self) -> httpx.AsyncClient:
        # One per call: an AsyncClient is bound to the event loop it first ran on.
        return httpx.AsyncClient(base_url=self.base_url + INTERNAL_PREFIX, timeout=self.timeout)

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
        async with self._client() as client:
            await _send(client, "POST", "/evict", EvictRequest(storage_key=storage_key).model_dump())

    async def _call(self, path: str, ref: ModelRef, req: BaseModel, out: type[M]) -> M:
        async with self._client() as client:
            resp = await _send(client, "POST", path, _payload(ref, req))
        return out.model_validate(resp.json())

    async def _open_stream(self, path: str, ref: ModelRef, req: BaseModel) -> AsyncIterator[str]:
        client = self._client()
        try:
            resp = await client.send(client.build_request("POST", path, json=_payload(ref, req)), stream=True)
        except httpx.HTTPError as exc:
            await client.aclose()
            raise _unreachable(exc) from exc
        if resp.status_code != 200:
            body = await resp.aread()
            await resp.aclose()
            await client.aclose()
            raise upstream_error(resp.status_code, body)
        return _relay(client, resp)


async def _relay(client: httpx.AsyncClient, resp: httpx.Response) -> AsyncIterator[str]:
    try:
        async for text in resp.aiter_text():
            yield text
    finally:
        await resp.aclose()
        await client.aclose()


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
