"""Read-through caches for the serving hot path (API key -> project, model name -> resolved model), so a
warm inference request makes no database round trip. Invalidation across processes: every entry is
tagged with the serving *generation* read before the database was, and only used while the generation
is unchanged. Whatever makes an entry wrong (revoking a key, deleting a model, changing a project's
limits) calls `bump_after_commit(session)`: once its transaction commits, the generation moves on in
this process and, with a Redis broker, in Redis (shared by every API process), so the next request
anywhere misses and reads the database again.

Reading the generation from before the database read makes a racing request safe: one that read the
old state still tagged it with the old generation. Without Redis (embedded mode: one API process) the
generation is this process's, and entries also expire after `LOCAL_TTL_S`, which bounds how long a
change made by another process (the CLI revoking a key) takes to show. With Redis unreachable
nothing is cached."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from functools import lru_cache
from typing import Any, Generic, TypeVar

from sqlalchemy import event
from sqlalchemy.orm import Session

from app.settings import get_settings

log = logging.getLogger(__name__)

REDIS_KEY = "tunehouse:serving-generation"
REDIS_TTL_S = 60.0  # a safety net only: with Redis, bumps invalidate at once
LOCAL_TTL_S = 2.0
MAX_ENTRIES = 10_000
_FLAG = "tunehouse_bump_generation"

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_local = [0]
_lock = threading.Lock()


@lru_cache
def _redis(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


def _redis_url() -> str | None:
    url = get_settings().broker_url
    return url if url.startswith(("redis://", "rediss://")) else None


_ASYNC: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()


async def generation_async() -> tuple[str, float] | None:
    """(the current generation, how long an entry tagged with it may live); None: do not cache. Read
    with this event loop's asyncio Redis client: no thread hop."""
    url = _redis_url()
    if url is None:
        return f"l{_local[0]}", LOCAL_TTL_S
    loop = asyncio.get_running_loop()
    client = _ASYNC.get(loop)
    if client is None:
        import redis.asyncio

        client = _ASYNC[loop] = redis.asyncio.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        shared = await client.get(REDIS_KEY)
    except Exception as exc:
        log.debug("serving cache off: Redis unavailable (%s)", type(exc).__name__)
        return None
    return f"r{int(shared or 0)}.l{_local[0]}", REDIS_TTL_S


def bump() -> None:
    with _lock:
        _local[0] += 1
    url = _redis_url()
    if url is not None:
        try:
            _redis(url).incr(REDIS_KEY)
        except Exception:  # other processes fall back to not caching while Redis is down
            log.warning("could not bump the serving generation in Redis", exc_info=True)


def bump_after_commit(session: Session) -> None:
    """Invalidate every serving cache once this session's transaction commits (not before: a request
    reading in between would cache the old state under the new generation)."""
    session.info[_FLAG] = True


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    if session.info.pop(_FLAG, False):
        bump()


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_FLAG, None)


class HotCache(Generic[K, V]):
    """A bounded map whose entries hold only under the generation they were read in, and until their TTL."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._data: OrderedDict[K, tuple[str, float, V]] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: K, gen: tuple[str, float] | None) -> V | None:
        with self._lock:
            entry = self._data.get(key)
            if gen is None or entry is None or entry[0] != gen[0] or entry[1] <= time.monotonic():
                self.misses += 1
                return None
            self.hits += 1
            return entry[2]

    def put(self, key: K, gen: tuple[str, float] | None, value: V) -> None:
        if gen is None:
            return
        with self._lock:
            self._data[key] = (gen[0], time.monotonic() + gen[1], value)
            self._data.move_to_end(key)
            while len(self._data) > self._max:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


class SingleFlight(Generic[K, V]):
    """Concurrent misses of one key share one lookup. When a hot entry expires under load, every request
    in flight misses it at once; without this each read the database (at 32 clients, 32 lookups per
    key per expiry: a quarter of the API's busy time in a profile). Waiters get the first caller's value
    or its exception."""

    def __init__(self) -> None:
        self._inflight: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[K, asyncio.Future[V]]]
        self._inflight = weakref.WeakKeyDictionary()

    async def run(self, key: K, lookup: Callable[[], Awaitable[V]]) -> V:
        inflight = self._inflight.setdefault(asyncio.get_running_loop(), {})
        pending = inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)  # a waiter cancelled leaves the lookup running
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        inflight[key] = future
        try:
            value = await lookup()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            del inflight[key]
        future.set_result(value)
        return value
