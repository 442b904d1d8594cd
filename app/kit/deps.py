"""Request dependency: the DB session, committed or rolled back at the request boundary. (The caller's
project is `app.auth.deps.CurrentProject`: kit imports no domain.)

Sessions are admitted by a per-app semaphore (`db_slots`) of fewer slots than the pool has
connections, taken on the event loop. Sync dependencies and endpoints run in the anyio worker-thread
pool, one hop each, and a session keeps its connection between hops; without admission, threads
blocked on the pool could wait for connections held by requests that wait for a thread (at ~100
concurrent requests: 30 s stalls, then pool timeouts). A request uses one connection at a time and
other users (reaper, /metrics, /readyz) stay within the pool's reserve, so a slot holder finds a
connection and a thread; requests over the limit queue on the loop, holding neither."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Concatenate, ParamSpec, TypeVar

import anyio
import anyio.to_thread
from fastapi import Depends, FastAPI, Request
from sqlalchemy.orm import Session, sessionmaker

from app.kit.db import get_sessionmaker, request_slots, session_scope

P = ParamSpec("P")
T = TypeVar("T")


THREAD_HEADROOM = 8  # worker threads beyond the slots, for work that holds no session


def db_slots(app: FastAPI) -> anyio.Semaphore:
    slots: anyio.Semaphore | None = getattr(app.state, "db_slots", None)
    if slots is None:
        n = request_slots()
        # More threads than slots: a slot holder (maybe holding a row or SQLite write lock) always
        # finds a thread, even while every other slot holder's thread waits on that lock.
        threads = anyio.to_thread.current_default_thread_limiter()
        threads.total_tokens = max(threads.total_tokens, n + THREAD_HEADROOM)
        slots = app.state.db_slots = anyio.Semaphore(n)
    return slots


def session_factory(request: Request) -> sessionmaker[Session]:
    return getattr(request.app.state, "sessionmaker", None) or get_sessionmaker()


def _finish(session: Session, ok: bool) -> None:
    try:
        if ok:
            session.commit()
        else:
            session.rollback()
    finally:
        session.close()


async def get_db(request: Request) -> AsyncIterator[Session]:
    async with db_slots(request.app):
        session = session_factory(request)()
        ok = False
        try:
            yield session
            ok = True
        finally:
            with anyio.CancelScope(shield=True):  # the connection goes back to the pool whatever happens
                await anyio.to_thread.run_sync(_finish, session, ok)


# scope="function": commit runs when the endpoint returns, before the response is sent.
DB = Annotated[Session, Depends(get_db, scope="function")]


def _unit_of_work(factory: sessionmaker[Session], fn: Callable[[Session], T]) -> T:
    with session_scope(factory) as session:
        return fn(session)


async def run_db(request: Request, fn: Callable[Concatenate[Session, P], T], *args: P.args,
                 **kwargs: P.kwargs) -> T:
    """`fn(session, ...)` in a worker thread, in a short session of its own (committed on success),
    under a slot: for async code that must not hold a connection while it awaits something slow
    (inference, an upload's body, a live event stream). Never call it while holding `DB`."""
    async with db_slots(request.app):
        return await anyio.to_thread.run_sync(
            _unit_of_work, session_factory(request), lambda session: fn(session, *args, **kwargs))
