"""Requests per minute per API key: a fixed 60 s window counted in Redis (one atomic script, shared by
every API replica) when the broker is Redis, else in this process (embedded mode has one API
process). The OpenAI `x-ratelimit-*-requests` headers go on every authenticated response."""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from fastapi import FastAPI, Request
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.kit.errors import TunehouseError
from app.orm import Project
from app.settings import get_settings

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60.0
STATE_KEY = "tunehouse_ratelimit"  # in the request's scope state, read by RateLimitHeaders
MAX_LOCAL_KEYS = 10_000

# INCR + PEXPIRE in one step: a window starts at its first request. A key left without a TTL (a crash
# between the two calls cannot happen in a script, but an old key could) gets one.
_HIT = """
local n = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
"""


class RateLimited(TunehouseError):
    status_code = 429
    type = "requests"
    code = "rate_limit_exceeded"


@dataclass(frozen=True)
class RateState:
    limit: int
    count: int  # requests in the current window, this one included
    reset_seconds: float

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.count)

    def headers(self) -> dict[str, str]:
        return {"x-ratelimit-limit-requests": str(self.limit),
                "x-ratelimit-remaining-requests": str(self.remaining),
                "x-ratelimit-reset-requests": duration(self.reset_seconds)}


def duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1.5s`, `1m0s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(round(seconds, 1), 60)
    text = f"{rest:.1f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


class Counter(Protocol):
    def hit(self, key: str, window: float) -> tuple[int, float]:
        """Count one request under `key`; (requests in the window, seconds until it resets)."""
        ...


class LocalCounter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int]] = {}

    def hit(self, key: str, window: float) -> tuple[int, float]:
        now = time.monotonic()
        with self._lock:
            start, n = self._windows.get(key, (now, 0))
            if now - start >= window:
                start, n = now, 0
            self._windows[key] = (start, n + 1)
            if len(self._windows) > MAX_LOCAL_KEYS:
                self._windows = {k: v for k, v in self._windows.items() if now - v[0] < window}
        return n + 1, start + window - now


class RedisCounter:
    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.script = self.client.register_script(_HIT)

    def hit(self, key: str, window: float) -> tuple[int, float]:
        n, ttl_ms = self.script(keys=[f"tunehouse:rl:{key}"], args=[int(window * 1000)])
        return int(n), int(ttl_ms) / 1000


@lru_cache
def _local() -> LocalCounter:
    return LocalCounter()


@lru_cache
def _redis(url: str) -> RedisCounter:
    return RedisCounter(url)


def count(key: str) -> tuple[int, float]:
    """Redis when the broker is Redis; this process's counter in embedded mode, or while Redis is down
    (a limit that holds per process beats failing every request)."""
    url = get_settings().broker_url
    if url.startswith(("redis://", "rediss://")):
        try:
            return _redis(url).hit(key, WINDOW_SECONDS)
        except Exception as exc:
            _warn_once_a_minute(exc)
    return _local().hit(key, WINDOW_SECONDS)


_last_warning = [0.0]


def _warn_once_a_minute(exc: Exception) -> None:
    now = time.monotonic()
    if now - _last_warning[0] >= WINDOW_SECONDS:
        _last_warning[0] = now
        log.warning("rate limiter: Redis unavailable (%s); counting in this process", type(exc).__name__)


def rpm_limit(project: Project) -> int:
    """The project's requests per minute per key (0: unlimited)."""
    return get_settings().rate_limit_rpm if project.rpm_limit is None else project.rpm_limit


def enforce_rate_limit(request: Request, project: Project, api_key: str) -> None:
    """Called once the key is authenticated: count the request, 429 past the limit. The key is
    counted by its hash: the limit is per key, even for keys of one project."""
    limit = rpm_limit(project)
    if limit <= 0:
        return
    n, reset = count(hashlib.sha256(api_key.encode()).hexdigest()[:32])
    rate = RateState(limit, n, reset)
    setattr(request.state, STATE_KEY, rate)
    if n > limit:
        exc = RateLimited(f"Rate limit reached for requests: this API key may make {limit} requests per minute. "
                          f"Try again in {duration(reset)}.")
        exc.headers = {"Retry-After": str(max(1, math.ceil(reset))), **rate.headers()}
        raise exc


class RateLimitHeaders:
    """ASGI middleware: the rate state the auth dependency left in the scope becomes response headers,
    on every response of an authenticated request, errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})

        async def send_with_headers(message: Message) -> None:
            rate = state.get(STATE_KEY)
            if message["type"] == "http.response.start" and isinstance(rate, RateState):
                headers = MutableHeaders(scope=message)
                for name, value in rate.headers().items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install_rate_limit_headers(app: FastAPI) -> None:
    app.add_middleware(RateLimitHeaders)
