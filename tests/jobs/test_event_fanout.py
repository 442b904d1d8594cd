"""Live event streams share one poller per job (`app.jobs.stream`): N followers of a job cost one events
query per poll interval, not N; each gets every event once, in order; a follower resuming from an older
Last-Event-ID reads the gap itself, then joins; the poller stops with the job or its last follower."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import event, update
from sqlalchemy.orm import Session, sessionmaker

from app.jobs import stream
from app.jobs.events import add_event
from app.kit.db import get_engine
from app.main import create_app
from app.orm import Job, Project
from tests.jobs.factories import add_job, seed_key_and_job
from tests.kit.test_concurrency import live_server

DEADLINE_S = 120.0  # for a stuck stream, not a latency bound


def _seed(factory: sessionmaker[Session], name: str, events: int, status: str = "running") -> tuple[str, str]:
    key, _, job = seed_key_and_job(factory, name, status, events)
    return key, job.id


def _append(factory: sessionmaker[Session], job_id: str, n: int, status: str | None = None) -> None:
    with factory() as s:
        for i in range(n):
            add_event(s, job_id, f"more {i}")
        if status:
            s.execute(update(Job).where(Job.id == job_id).values(status=status))
        s.commit()


@contextmanager
def events_selects() -> Iterator[list[str]]:
    """SELECTs on job_events issued by any thread, as they go."""
    seen: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM job_events" in statement:
            seen.append(statement)

    event.listen(get_engine(), "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(get_engine(), "before_cursor_execute", count)


class Follower:
    """One SSE follower: the seqs it received, in order, and the end status."""

    def __init__(self, client: httpx.AsyncClient, job_id: str, last_event_id: int | None = None) -> None:
        self.seqs: list[int] = []
        self.end: str | None = None
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
        self.task = asyncio.create_task(self._run(client, job_id, headers))

    async def _run(self, client: httpx.AsyncClient, job_id: str, headers: dict[str, str]) -> None:
        async with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events?stream=true", headers=headers) as r:
            assert r.status_code == 200
            kind = None
            async for line in r.aiter_lines():
                if line.startswith("id: "):
                    self.seqs.append(int(line[4:]))
                elif line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind == "end":
                    self.end = line


async def _until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def _feeds(app: FastAPI) -> dict[str, stream.Feed]:
    hubs = getattr(app.state, "event_hubs", None) or {}
    return {k: f for hub in list(hubs.values()) for k, f in hub.feeds.items()}


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


def test_fifty_followers_share_one_query_per_poll(committed_db: sessionmaker[Session]) -> None:
    n = 50
    key, job_id = _seed(committed_db, "fanout", events=3)
    app = create_app()

    async def scenario(base: str) -> None:
        limits = httpx.Limits(max_connections=n + 10)
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"},
                                     timeout=DEADLINE_S, limits=limits) as client:
            followers = [Follower(client, job_id) for _ in range(n)]
            await _until(lambda: all(len(f.seqs) == 3 for f in followers), "the history")
            assert len(_feeds(app)) == 1
            feed = _feeds(app)[job_id]
            history = followers[0].seqs

            with events_selects() as selects:
                polls0, t0 = feed.polls, time.monotonic()
                for batch in range(1, 4):
                    await _in_thread(_append, committed_db, job_id, 2)
                    await _until(lambda b=batch: all(len(f.seqs) == 3 + 2 * b for f in followers), "a batch")
                polls, elapsed, queries = feed.polls - polls0, time.monotonic() - t0, len(selects)
            # One read per poll (an in-flight one may straddle either end), however many followers;
            # each poll that found less than a page waits an interval first.
            assert polls - 1 <= queries <= polls + 1, (queries, polls)
            assert polls <= elapsed / stream.POLL_S + 2, (polls, elapsed)
            assert queries < n

            # A late follower resuming from before the shared cursor gets the gap, then the live events.
            late = Follower(client, job_id, last_event_id=history[1])
            await _until(lambda: len(late.seqs) >= 7, "the late follower's gap")
            await _in_thread(_append, committed_db, job_id, 1, "succeeded")
            everyone = [*followers, late]
            await _until(lambda: all(f.task.done() for f in everyone), "the end of every stream")
            for f in everyone:
                f.task.result()
            expected = followers[0].seqs
            assert len(expected) == 3 + 6 + 1 and expected == sorted(set(expected))
            assert all(f.seqs == expected for f in followers)
            assert late.seqs == expected[2:]
            assert all(f.end == 'data: {"status": "succeeded"}' for f in everyone)
            await _until(lambda: not _feeds(app), "the poller to stop with the job")

    with live_server(app) as base:
        asyncio.run(scenario(base))


def test_poller_stops_when_the_last_follower_leaves(committed_db: sessionmaker[Session]) -> None:
    key, job_id = _seed(committed_db, "fanout-leave", events=1)
    app = create_app()

    async def scenario(base: str) -> None:
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"},
                                     timeout=DEADLINE_S) as client:
            followers = [Follower(client, job_id) for _ in range(2)]
            await _until(lambda: all(f.seqs for f in followers), "the history")
            task = _feeds(app)[job_id].task
            assert task is not None
            followers[0].task.cancel()
            await asyncio.sleep(2 * stream.POLL_S)  # not a timing assertion: one follower still holds it
            assert job_id in _feeds(app)
            followers[1].task.cancel()
            await asyncio.gather(*(f.task for f in followers), return_exceptions=True)
            await _until(lambda: not _feeds(app) and task.done(), "the poller to stop")

    with live_server(app) as base:
        asyncio.run(scenario(base))


def _frames(body: str) -> list[int]:
    return [int(line[4:]) for line in body.splitlines() if line.startswith("id: ")]


def test_stream_of_a_finished_job_and_resume(app: FastAPI, client: TestClient, other_client: TestClient,
                                             project_client: tuple[TestClient, Project], db: Session) -> None:
    """Through TestClient: the history, then `end`; Last-Event-ID resumes after it; other projects 404."""
    _, project = project_client
    job = add_job(db, project, "succeeded", events=5)
    db.commit()
    url = f"/v1/fine_tuning/jobs/{job.id}/events"
    with client.stream("GET", url, headers={"Accept": "text/event-stream"}) as r:
        body = "".join(r.iter_text())
    seqs = _frames(body)
    assert len(seqs) == 5 and seqs == sorted(seqs)
    assert body.rstrip().endswith('data: {"status": "succeeded"}')
    with client.stream("GET", f"{url}?stream=true", headers={"Last-Event-ID": str(seqs[2])}) as r:
        assert _frames("".join(r.iter_text())) == seqs[3:]
    assert other_client.get(f"{url}?stream=true").status_code == 404
    assert client.get(f"{url}?stream=true", headers={"Last-Event-ID": "x"}).status_code == 400
    assert not _feeds(app)
