"""OpenAI request -> engine calls -> OpenAI responses, for an already-resolved model. Runs in the
inference worker (`worker/inference_server.py`), never in the API process: it imports torch.
Validation errors are raised before a stream starts, so they come back as plain 400s."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path
from typing import Any

from app.inference.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    PredictionList,
    PredictionRequest,
    SamplingParams,
    Usage,
)
from app.inference.service import check_task, error_event, sse
from app.kit.errors import GatewayTimeout, InvalidRequest
from app.kit.storage import get_storage
from app.models_registry.catalog import base_model_path, get_spec
from app.settings import Settings
from ml.inference.engine import DirStore, Engine, EngineConfig
from ml.inference.loading import ModelMeta
from ml.inference.sampling import RowParams
from ml.inference.types import BASE_KEY_PREFIX, GENERATIVE_TASKS, PREDICTIVE_TASKS, ModelRef

Rows = list[tuple[list[int], RowParams]]


def engine_config(s: Settings) -> EngineConfig:
    return EngineConfig(max_batch_size=s.inference_max_batch_size, max_wait_ms=s.inference_max_wait_ms,
                        max_adapters=s.inference_max_adapters, max_bases=s.inference_max_bases,
                        max_full_models=s.inference_max_full_models, max_input_tokens=s.inference_max_input_tokens,
                        max_new_tokens=s.inference_max_new_tokens, device=s.device)


def make_engine(settings: Settings, config: EngineConfig | None = None) -> Engine:
    """The engine wired to this service: catalog base models and the artifact storage."""
    return Engine(config or engine_config(settings), base_dir=lambda base: base_model_path(get_spec(base)),
                  storage=CatalogDirs(get_storage()))


class CatalogDirs:
    """The artifact storage, plus catalog base models served as themselves (`base:<id>` keys, which
    the API hands over only when `serve_base_models` is on)."""

    def __init__(self, storage: DirStore) -> None:
        self.storage = storage

    def local_dir(self, key: str) -> Path:
        if key.startswith(BASE_KEY_PREFIX):
            return base_model_path(get_spec(key.removeprefix(BASE_KEY_PREFIX)))
        return self.storage.local_dir(key)


class LocalInference:
    def __init__(self, engine: Engine, timeout_s: float) -> None:
        self.engine = engine
        self.timeout_s = timeout_s

    # --- chat ---

    async def chat(self, ref: ModelRef, req: ChatCompletionRequest) -> ChatCompletion:
        meta, rows, prompt_tokens = await self._chat_rows(ref, req)
        texts, reasons, used = await self._collect(meta, rows)
        choices = [ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=r)
                   for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        return ChatCompletion(id=_id("chatcmpl"), created=int(time.time()), model=ref.name, choices=choices,
                              usage=_usage(prompt_tokens, sum(used)))

    async def open_chat_stream(self, ref: ModelRef, req: ChatCompletionRequest) -> AsyncIterator[str]:
        meta, rows, prompt_tokens = await self._chat_rows(ref, req)
        return self._stream(meta, rows, prompt_tokens, ref.name, req, chat=True)

    async def _chat_rows(self, ref: ModelRef, req: ChatCompletionRequest) -> tuple[ModelMeta, Rows, int]:
        meta = await self._meta(ref, GENERATIVE_TASKS, "/v1/chat/completions")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await asyncio.to_thread(meta.tok.chat, messages)
        self.engine.check_length(meta, ids, 0, "messages")
        params = self._row_params(meta, req, len(ids))
        return meta, [(ids, _nth(params, j)) for j in range(req.n)], len(ids)

    # --- legacy completions ---

    async def completion(self, ref: ModelRef, req: CompletionRequest) -> Completion:
        meta, rows, prompt_tokens = await self._completion_rows(ref, req)
        texts, reasons, used = await self._collect(meta, rows)
        choices = [CompletionChoice(index=i, text=t, finish_reason=r)
                   for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        return Completion(id=_id("cmpl"), created=int(time.time()), model=ref.name, choices=choices,
                          usage=_usage(prompt_tokens, sum(used)))

    async def open_completion_stream(self, ref: ModelRef, req: CompletionRequest) -> AsyncIterator[str]:
        meta, rows, prompt_tokens = await self._completion_rows(ref, req)
        return self._stream(meta, rows, prompt_tokens, ref.name, req, chat=False)

    async def _completion_rows(self, ref: ModelRef, req: CompletionRequest) -> tuple[ModelMeta, Rows, int]:
        meta = await self._meta(ref, GENERATIVE_TASKS, "/v1/completions")
        prompts = req.prompts()
        if not prompts:
            raise InvalidRequest("'prompt' must not be empty.", param="prompt")
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(await asyncio.to_thread(lambda: [meta.tok.encode(t) for t in texts]))
        all_ids = [next(encoded) if isinstance(p, str) else list(p) for p in prompts]
        rows: Rows = []
        for i, ids in enumerate(all_ids):
            self.engine.check_length(meta, ids, i, "prompt")
            if not ids:
                raise InvalidRequest(f"Prompt {i} is empty.", param="prompt")
            params = self._row_params(meta, req, len(ids))
            rows += [(ids, _nth(params, j)) for j in range(req.n)]
        return meta, rows, sum(len(ids) for ids in all_ids)

    # --- predictions ---

    async def predictions(self, ref: ModelRef, req: PredictionRequest) -> PredictionList:
        meta = await self._meta(ref, PREDICTIVE_TASKS, "/v1/predictions")
        texts = req.inputs()
        if not texts:
            raise InvalidRequest("'input' must not be empty.", param="input")
        if meta.info.task == "masked_lm":
            texts = [t.replace("[MASK]", meta.mask_token or "[MASK]") for t in texts]
        ids = await self.engine.encode(meta, texts)
        if meta.info.task == "masked_lm":
            _require_masks(meta, ids)
        try:
            results = await asyncio.wait_for(self.engine.predict(meta, ids, req.top_k), self.timeout_s)
        except TimeoutError:
            raise _timeout(self.timeout_s) from None
        tokens = sum(len(r) for r in ids)
        return PredictionList(model=ref.name, data=[{"index": i, **r} for i, r in enumerate(results)],
                              usage=Usage(prompt_tokens=tokens, total_tokens=tokens))

    async def evict(self, storage_key: str) -> None:
        await self.engine.evict(storage_key)

    # --- shared ---

    async def _meta(self, ref: ModelRef, tasks: tuple[str, ...], endpoint: str) -> ModelMeta:
        check_task(ref.name, ref.task, tasks, endpoint)
        meta = await self.engine.meta(ref)
        check_task(ref.name, meta.info.task, tasks, endpoint)
        return meta

    def _row_params(self, meta: ModelMeta, req: SamplingParams, prompt_len: int) -> RowParams:
        limit = self.engine.config.max_new_tokens
        asked = req.requested_max_tokens()
        if asked is not None and asked > limit:
            param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise InvalidRequest(f"{param} is {asked}; the maximum is {limit} (inference_max_new_tokens).",
                                 param=param, code="max_tokens_too_large")
        budget = asked or limit
        if meta.context:
            room = meta.context - prompt_len
            if room < 1:
                raise InvalidRequest(f"The prompt fills the model's context ({meta.context} tokens).",
                                     param="messages", code="context_length_exceeded")
            budget = min(budget, room)
        return RowParams(max_new_tokens=budget, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                         stop=tuple(req.stop_list()))

    async def _collect(self, meta: ModelMeta, rows: Rows) -> tuple[list[str], list[str], list[int]]:
        texts, reasons, used = [""] * len(rows), ["stop"] * len(rows), [0] * len(rows)
        try:
            async with asyncio.timeout(self.timeout_s), aclosing(self.engine.generate(meta, rows)) as events:
                async for i, event in events:
                    texts[i] += event.text
                    if event.finish_reason is not None:
                        reasons[i], used[i] = event.finish_reason, event.completion_tokens
        except TimeoutError:
            raise _timeout(self.timeout_s) from None
        return texts, reasons, used

    async def _stream(self, meta: ModelMeta, rows: Rows, prompt_tokens: int, model: str,
                      req: SamplingParams, chat: bool) -> AsyncIterator[str]:
        chunk = _ChunkMaker(model, chat)
        used = 0
        if chat:
            for i in range(len(rows)):
                yield sse(chunk.make(i, "", role=True))
        try:
            async with aclosing(self.engine.generate(meta, rows)) as events:
                async for i, event in events:
                    if event.text or event.finish_reason:
                        yield sse(chunk.make(i, event.text, event.finish_reason))
                    used += event.completion_tokens
        except Exception as exc:
            yield error_event(exc)
            return
        if req.stream_options is not None and req.stream_options.include_usage:
            yield sse(chunk.usage(_usage(prompt_tokens, used)))
        yield sse("[DONE]")


class _ChunkMaker:
    def __init__(self, model: str, chat: bool) -> None:
        self.id = _id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.model = model
        self.chat = chat

    def make(self, index: int, text: str, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else (
                {"content": text} if text else {})
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None,
                                      "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        return self._wrap([choice])

    def usage(self, usage: Usage) -> dict[str, Any]:
        return {**self._wrap([]), "usage": usage.model_dump()}

    def _wrap(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}


def _require_masks(meta: ModelMeta, ids: list[list[int]]) -> None:
    for i, row in enumerate(ids):
        if meta.mask_id is None or meta.mask_id not in row:
            raise InvalidRequest(f"Input {i} has no mask token; write [MASK] where a word goes.",
                                 param="input", code="missing_mask")


def _nth(params: RowParams, j: int) -> RowParams:
    """Choice j of n: its own seed, so choices differ but a seeded request repeats exactly."""
    return params if params.seed is None else replace(params, seed=params.seed + j)


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _timeout(seconds: float) -> GatewayTimeout:
    return GatewayTimeout(f"Inference did not finish within {seconds:g} seconds (inference_timeout_seconds).")


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
