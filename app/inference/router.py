"""Inference endpoints: OpenAI-compatible `/v1/chat/completions` and `/v1/completions` (causal
LMs, `stream` as server-sent events) and the `/v1/predictions` extension (classification,
regression, masked LM). The model is resolved here, in the API, scoped to the caller's project."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.auth.deps import CurrentProject
from app.inference.resolve import ModelDeleted, resolve_model
from app.inference.runtime import get_inference
from app.inference.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    PredictionList,
    PredictionRequest,
)
from app.inference.service import Inference, check_task
from app.kit.deps import DB
from ml.inference.types import GENERATIVE_TASKS, PREDICTIVE_TASKS, ModelRef

log = logging.getLogger(__name__)
router = APIRouter(tags=["inference"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, db: DB,
                                 project: CurrentProject) -> ChatCompletion | StreamingResponse:
    """Chat with a fine-tuned causal LM (the tokenizer's chat template, generation prompt added)."""
    inference = get_inference(request.app)
    ref = await _resolve(inference, db, project.id, body.model, GENERATIVE_TASKS, "/v1/chat/completions")
    if body.stream:
        return _sse(await inference.open_chat_stream(ref, body))
    return await inference.chat(ref, body)


@router.post("/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request, db: DB,
                            project: CurrentProject) -> Completion | StreamingResponse:
    """Legacy text completions: `prompt` is a string, a list of strings or token ids."""
    inference = get_inference(request.app)
    ref = await _resolve(inference, db, project.id, body.model, GENERATIVE_TASKS, "/v1/completions")
    if body.stream:
        return _sse(await inference.open_completion_stream(ref, body))
    return await inference.completion(ref, body)


@router.post("/predictions")
async def create_predictions(body: PredictionRequest, request: Request, db: DB,
                             project: CurrentProject) -> PredictionList:
    """Extension: batched predictions from classification, regression and masked-LM models.

    - classification: `{"index", "label", "score", "scores": {label: probability}}`
    - regression: `{"index", "value"}`
    - masked_lm: `{"index", "fills": [[{"token", "token_str", "score"}, ...top_k] per [MASK]]}`
    """
    inference = get_inference(request.app)
    ref = await _resolve(inference, db, project.id, body.model, PREDICTIVE_TASKS, "/v1/predictions")
    return await inference.predictions(ref, body)


async def _resolve(inference: Inference, db: DB, project_id: str, model: str, tasks: tuple[str, ...],
                   endpoint: str) -> ModelRef:
    try:
        ref = await run_in_threadpool(resolve_model, db, project_id, model)
    except ModelDeleted as exc:
        for key in exc.storage_keys:
            with contextlib.suppress(Exception):
                await inference.evict(key)
        raise
    check_task(ref.name, ref.task, tasks, endpoint)
    return ref


def _sse(stream: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)
