"""Live job event streams (SSE): followers of one job in one API process share one poller.

The poller (a `Feed`, one per job and event loop) reads the job's events after the highest seq it
has fanned out, once per poll interval, renders each as an SSE frame once, and hands the frames to
every follower's queue: one events query per interval whatever the number of followers. A follower
that resumes from a Last-Event-ID older than the feed's cursor first reads the gap itself (once, up
to the cursor), then drains its queue; frames at or below what it already sent are skipped, so each
event reaches it once, in order. The feed ends after the job is finished and its last events are
delivered (`event: end`), or at its next turn after the last follower left.

Each read is one short session in a worker thread under a DB slot (`app.kit.deps.db_slots`): the
event loop never blocks and no connection is held between polls."""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio.to_thread
from fastapi import FastAPI, Request
from sqlalchemy.orm import Session

from app.jobs import service
from app.kit.db import get_sessionmaker, session_scope
from app.kit.deps import db_slots
from app.orm import Job

POLL_S = 0.5  # between reads of a job's new events
WAKE_S = 1.0  # a follower checks its connection at least this often
KEEPALIVE_S = 15.0  # an SSE comment after this long without a frame keeps proxies from timing out
PAGE = 500  # events per read; a full page is followed by the next read at once

T = TypeVar("T")
Frame = tuple[int, bytes]  # (seq, the rendered SSE frame)


@dataclass(frozen=True)
class End:
    status: str


@dataclass(frozen=True)
class Failed:
    error: BaseException


Item = list[Frame] | End | Failed


def read_frames(session: Session, job_id: str, after: int, upto: int | None = None) -> tuple[list[Frame], str]:
    """The job's events after `after` (up to `upto`) as SSE frames, and the job's status."""
    frames = []
    for e in service.events_since(session, job_id, after, PAGE, upto):
        frame = f"id: {e.seq}\nevent: {e.type}\ndata: {service.event_out(e).model_dump_json()}\n\n"
        frames.append((e.seq, frame.encode()))
    return frames, session.get_one(Job, job_id).status


@dataclass(eq=False)
class Feed:
    job_id: str
    cursor: int  # the highest seq fanned out (or the first follower's starting point)
    followers: set[asyncio.Queue[Item]] = field(default_factory=set)
    polls: int = 0  # reads so far (tests and the bench compare it with the queries issued)
    task: asyncio.Task[None] | None = None

    def publish(self, item: Item) -> None:
        for queue in self.followers:
            queue.put_nowait(item)


class Hub:
    """The feeds of one app on one event loop (one per API process; TestClient opens more loops)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.feeds: dict[str, Feed] = {}

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        factory = getattr(self.app.state, "sessionmaker", None) or get_sessionmaker()

        def unit() -> T:
            with session_scope(factory) as session:
                return fn(session, *args)

        async with db_slots(self.app):
            return await anyio.to_thread.run_sync(unit)

    def join(self, job_id: str, seq: int) -> tuple[Feed, asyncio.Queue[Item]]:
        feed = self.feeds.get(job_id)
        if feed is None:
            feed = self.feeds[job_id] = Feed(job_id, seq)
            feed.task = asyncio.get_running_loop().create_task(self._run(feed))
        queue: asyncio.Queue[Item] = asyncio.Queue()
        feed.followers.add(queue)
        return feed, queue

    def leave(self, feed: Feed, queue: asyncio.Queue[Item]) -> None:
        feed.followers.discard(queue)
        if not feed.followers and self.feeds.get(feed.job_id) is feed:
            del self.feeds[feed.job_id]  # a new follower starts a new feed; this one stops at its next turn

    async def _run(self, feed: Feed) -> None:
        try:
            while feed.followers and self.feeds.get(feed.job_id) is feed:
                feed.polls += 1
                frames, status = await self.db(read_frames, feed.job_id, feed.cursor)
                if frames:
                    feed.cursor = frames[-1][0]
                    feed.publish(frames)
                elif status in service.TERMINAL:
                    feed.publish(End(status))
                    return
                if len(frames) < PAGE:
                    await asyncio.sleep(POLL_S)
        except Exception as exc:  # a DB outage: every follower's stream fails, as its own poll would
            feed.publish(Failed(exc))
        finally:
            if self.feeds.get(feed.job_id) is feed:
                del self.feeds[feed.job_id]


def hub_of(app: FastAPI) -> Hub:
    hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub] | None = getattr(app.state, "event_hubs", None)
    if hubs is None:
        hubs = app.state.event_hubs = weakref.WeakKeyDictionary()
    loop = asyncio.get_running_loop()
    hub = hubs.get(loop)
    if hub is None:
        hub = hubs[loop] = Hub(app)
    return hub


async def follow(request: Request, job_id: str, seq: int) -> AsyncIterator[bytes]:
    """SSE frames of the job's events after `seq`, oldest first, live, until the job is finished;
    `id:` is the resume cursor. The caller has checked the job is the project's."""
    hub = hub_of(request.app)
    feed, queue = hub.join(job_id, seq)
    sent = seq
    try:
        upto = feed.cursor
        while sent < upto:  # resuming from before the shared cursor: the gap, read once
            frames, _ = await hub.db(read_frames, job_id, sent, upto)
            if not frames:
                break
            for n, chunk in frames:
                sent = n
                yield chunk
        idle = 0.0
        while not await request.is_disconnected():
            try:
                item = await asyncio.wait_for(queue.get(), WAKE_S)
            except TimeoutError:
                idle += WAKE_S
                if idle >= KEEPALIVE_S:
                    yield b": keep-alive\n\n"
                    idle = 0.0
                continue
            idle = 0.0
            if isinstance(item, End):
                yield f"event: end\ndata: {json.dumps({'status': item.status})}\n\n".encode()
                return
            if isinstance(item, Failed):
                raise item.error
            for n, chunk in item:
                if n > sent:
                    sent = n
                    yield chunk
    finally:
        hub.leave(feed, queue)
