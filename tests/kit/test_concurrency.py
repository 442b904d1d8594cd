"""The API under concurrency, served for real (uvicorn in a thread, the committed test database): more
requests in flight than the worker-thread pool (40) and the connection pool (30) must all succeed.
Before DB admission (`app.kit.deps.db_slots`), threads blocked on the pool waited for connections
held by requests that waited for a thread: 30 s stalls, then 500s (QueuePool limit reached)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from app.inference.schemas import PredictionList, PredictionRequest, Usage
from app.kit.db import request_slots
from app.main import create_app
from app.orm import FineTunedModel, Job, Project
from ml.inference.types import ModelRef
from tests.jobs.factories import seed_key_and_job

CLIENT_TIMEOUT_S = 300.0  # a deadline for a stuck server, not a latency bound


@contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning",
                                           access_log=False, backlog=2048))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _seed(factory: sessionmaker[Session], name: str) -> tuple[str, Project, Job]:
    return seed_key_and_job(factory, name)


async def _gather(base: str, key: str, n: int, request: Any) -> Counter[Any]:
    """`n` requests at once; their status codes (or exception names), counted."""
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"},
                                 timeout=CLIENT_TIMEOUT_S, limits=httpx.Limits(max_connections=n)) as client:
        results = await asyncio.gather(*(request(client) for _ in range(n)), return_exceptions=True)
    return Counter(r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in results)


def test_200_concurrent_lists_all_succeed(committed_db: sessionmaker[Session]) -> None:
    key, _, _ = _seed(committed_db, "concurrency-lists")
    with live_server(create_app()) as base:
        counts = asyncio.run(_gather(base, key, 200, lambda c: c.get("/v1/fine_tuning/jobs")))
    assert counts == {200: 200}


class GatedInference:
    """Answers predictions only once `expected` of them are in flight at the same time (or a deadline
    passes): the API must not hold a DB connection per request while inference runs."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.arrived = 0

    async def predictions(self, ref: ModelRef, req: PredictionRequest) -> PredictionList:
        self.arrived += 1  # one event loop (the server's): no lock needed
        deadline = time.monotonic() + 120
        while self.arrived < self.expected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.arrived} of {self.expected} requests reached inference")
            await asyncio.sleep(0.01)
        return PredictionList(model=ref.name, data=[{"index": 0, "label": "x"}],
                              usage=Usage(prompt_tokens=1, total_tokens=1))

    async def evict(self, storage_key: str) -> None:
        return None


def test_inference_requests_hold_no_connection(committed_db: sessionmaker[Session]) -> None:
    key, project, job = _seed(committed_db, "concurrency-inference")
    name = f"ft:minilm-l6:{project.name}:t:{job.id}"
    with committed_db() as s:
        s.add(FineTunedModel(id=name, project_id=project.id, job_id=job.id, base_model="minilm-l6",
                             task="classification", training_type="lora", storage_key="models/none"))
        s.commit()
    n = request_slots() + 20  # more than the connection pool holds
    app = create_app()
    app.state.inference = GatedInference(n)
    with live_server(app) as base:
        counts = asyncio.run(_gather(base, key, n, lambda c: c.post("/v1/predictions",
                                                                     json={"model": name, "input": "hi"})))
    assert counts == {200: n}
    assert app.state.inference.arrived == n


def test_event_stream_followers_do_not_block_requests(committed_db: sessionmaker[Session]) -> None:
    """Live event streams poll in worker threads, one short session per poll: other requests go on."""
    followers = 10
    key, _, job = _seed(committed_db, "concurrency-sse")

    async def scenario(base: str) -> tuple[Counter[Any], list[int]]:
        statuses: list[int] = []
        opened = asyncio.Event()
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"},
                                     timeout=CLIENT_TIMEOUT_S) as client:

            async def follow() -> None:
                async with client.stream("GET", f"/v1/fine_tuning/jobs/{job.id}/events?stream=true") as r:
                    statuses.append(r.status_code)
                    if len(statuses) == followers:
                        opened.set()
                    async for _ in r.aiter_bytes():
                        pass

            streams = [asyncio.create_task(follow()) for _ in range(followers)]
            await asyncio.wait_for(opened.wait(), CLIENT_TIMEOUT_S)
            counts = await _gather(base, key, 100, lambda c: c.get(f"/v1/fine_tuning/jobs/{job.id}"))
            assert not any(t.done() for t in streams), "a follower's stream ended early"
            for t in streams:
                t.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
        return counts, statuses

    with live_server(create_app()) as base:
        counts, statuses = asyncio.run(scenario(base))
    assert counts == {200: 100}
    assert statuses == [200] * followers
