"""Inference endpoints: OpenAI-compatible `/v1/chat/completions` and `/v1/completions` (causal
LMs, `stream` as server-sent events) and the `/v1/predictions` extension (classification,
regression, masked LM). The model is resolved here, in the API, scoped to the caller's project."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from app.auth.deps import DetachedProject, serving_generation
from app.inference.resolve import ModelDeleted, check_base, resolve_model
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
from app.kit.deps import run_db, session_factory
from app.kit.hotcache import HotCache, SingleFlight
from app.settings import get_settings
from app.tenancy.service import served, served_stream  # in memory: written in batches
from ml.inference.types import GENERATIVE_TASKS, PREDICTIVE_TASKS, ModelRef

log = logging.getLogger(__name__)
router = APIRouter(tags=["inference"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


_STREAMED = "The completion; with `stream`, server-sent events (`text/event-stream`) instead"


@router.post("/chat/completions", response_model=None,
             responses={200: {"model": ChatCompletion, "description": _STREAMED}})
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 project: DetachedProject) -> ChatCompletion | StreamingResponse:
    """Chat with a fine-tuned causal LM, or a catalog base causal LM by its id (the tokenizer's chat
    template, generation prompt added)."""
    inference = get_inference(request.app)
    ref = await _resolve(request, inference, project.id, body.model, GENERATIVE_TASKS, "/v1/chat/completions")
    if body.stream:
        served_stream(project.id, body.n, session_factory(request))
        return _sse(await inference.open_chat_stream(ref, body))
    return served(project.id, await inference.chat(ref, body), session_factory(request))


@router.post("/completions", response_model=None, responses={200: {"model": Completion, "description": _STREAMED}})
async def create_completion(body: CompletionRequest, request: Request,
                            project: DetachedProject) -> Completion | StreamingResponse:
    """Legacy text completions (fine-tuned or catalog base causal LMs): `prompt` is a string, a list of
    strings or token ids."""
    inference = get_inference(request.app)
    ref = await _resolve(request, inference, project.id, body.model, GENERATIVE_TASKS, "/v1/completions")
    if body.stream:
        served_stream(project.id, body.n * len(body.prompts()), session_factory(request))
        return _sse(await inference.open_completion_stream(ref, body))
    return served(project.id, await inference.completion(ref, body), session_factory(request))


@router.post("/predictions", response_model=PredictionList)
async def create_predictions(body: PredictionRequest, request: Request,
                             project: DetachedProject) -> Response:
    """Extension: batched predictions from fine-tuned classification, regression and masked-LM models
    (a base model id answers 400 `model_not_servable`: its task head is untrained).

    - classification: `{"index", "label", "score", "scores": {label: probability}}`
    - regression: `{"index", "value"}`
    - masked_lm: `{"index", "fills": [[{"token", "token_str", "score"}, ...top_k] per [MASK]]}`
    """
    inference = get_inference(request.app)
    ref = await _resolve(request, inference, project.id, body.model, PREDICTIVE_TASKS, "/v1/predictions")
    result = served(project.id, await inference.predictions(ref, body), session_factory(request))
    return Response(result.model_dump_json(), media_type="application/json")  # one serialization pass


async def _resolve(request: Request, inference: Inference, project_id: str, model: str,
                   tasks: tuple[str, ...], endpoint: str) -> ModelRef:
    """From `MODELS` when resolved recently under the current generation (see `app.kit.hotcache`), else
    in a short session of its own: no connection is held while inference runs (the key was checked in
    another), so concurrent inference requests are not bounded by the pool."""
    gen = await serving_generation(request)  # read by the auth dependency already
    ref = MODELS.get((project_id, model), gen)
    if ref is None:
        ref = await RESOLVING.run((project_id, model), lambda: _resolve_uncached(request, inference, project_id,
                                                                                 model))
        MODELS.put((project_id, model), gen, ref)
    check_base(ref, tasks, get_settings().serve_base_models)
    check_task(ref.name, ref.task, tasks, endpoint)
    return ref


MODELS: HotCache[tuple[str, str], ModelRef] = HotCache()  # (project id, model) -> its resolution
RESOLVING: SingleFlight[tuple[str, str], ModelRef] = SingleFlight()


async def _resolve_uncached(request: Request, inference: Inference, project_id: str, model: str) -> ModelRef:
    try:
        return await run_db(request, resolve_model, project_id, model)
    except ModelDeleted as exc:
        for key in exc.storage_keys:
            with contextlib.suppress(Exception):
                await inference.evict(key)
        raise


def _sse(stream: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)
