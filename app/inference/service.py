"""The inference contract the API serves through: `Inference`, implemented by
`app.inference.remote.RemoteInference` (the API process: forwards to an inference worker) and
`app.inference.local.LocalInference` (the inference worker: runs the engine). Torch-free."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

from app.inference.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    PredictionList,
    PredictionRequest,
)
from app.kit.errors import InvalidRequest, as_tunehouse_error
from ml.inference.types import PREDICTIVE_TASKS, ModelRef


class Inference(Protocol):
    async def chat(self, ref: ModelRef, req: ChatCompletionRequest) -> ChatCompletion: ...
    async def open_chat_stream(self, ref: ModelRef, req: ChatCompletionRequest) -> AsyncIterator[str]: ...
    async def completion(self, ref: ModelRef, req: CompletionRequest) -> Completion: ...
    async def open_completion_stream(self, ref: ModelRef, req: CompletionRequest) -> AsyncIterator[str]: ...
    async def predictions(self, ref: ModelRef, req: PredictionRequest) -> PredictionList: ...
    async def evict(self, storage_key: str) -> None: ...


def check_task(name: str, task: str, allowed: tuple[str, ...], endpoint: str) -> None:
    if task not in allowed:
        hint = "/v1/predictions" if task in PREDICTIVE_TASKS else "/v1/chat/completions or /v1/completions"
        raise InvalidRequest(
            f"Model '{name}' is a {task} model; {endpoint} serves {' / '.join(allowed)} models. Use {hint}.",
            param="model", code="unsupported_task")


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def error_event(exc: BaseException) -> str:
    return sse(as_tunehouse_error(exc, "The server had an error during generation.").body())
