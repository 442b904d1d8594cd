"""Prometheus `/metrics`: request latency by route template and status (middleware), the process's
CPU and memory, plus values that domains read at scrape time through collectors they register
(`register_collector`, `register_db_collector`). Enable with `install_metrics(app)`.

They span every project, so only the operator reads them: `Authorization: Bearer <TUNEHOUSE_OPERATOR_TOKEN>`;
with no token set the route answers 404, unless `TUNEHOUSE_METRICS_PUBLIC=true` opens it to all."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from functools import partial

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.kit.db import get_sessionmaker
from app.kit.errors import AuthenticationError, NotFound
from app.settings import get_settings

log = logging.getLogger(__name__)

Collector = Callable[[], None]
DbCollector = Callable[[Session], None]

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes, ...

REQUEST_SECONDS = Histogram(
    "tunehouse_http_request_duration_seconds", "HTTP request latency (streams: until the stream ends)",
    ["method", "route", "status"], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
SCRAPE_ERRORS = Gauge("tunehouse_metrics_scrape_errors", "Collectors that failed on the last scrape",
                      registry=REGISTRY)


# --- request latency --------------------------------------------------------------------------

def _route_template(scope: Scope) -> str:
    """The matched route's full template (`/v1/fine_tuning/jobs/{job_id}`). FastAPI >= 0.160 keeps
    the prefixed path on the effective route context; older versions on the route itself."""
    for holder in ((scope.get("fastapi") or {}).get("effective_route_context"), scope.get("route")):
        template = getattr(holder, "path_format", None)
        if template:
            return str(template)
    return "unmatched"


class MetricsMiddleware:
    """Pure ASGI (no response buffering); labels by the matched route template, never the raw path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            REQUEST_SECONDS.labels(scope["method"], _route_template(scope), str(status[0])).observe(
                time.perf_counter() - start)


# --- scrape-time collectors -------------------------------------------------------------------

# Keyed by name: registering again (one app per test) replaces instead of running twice.
_COLLECTORS: dict[str, Collector] = {}
_DB_COLLECTORS: dict[str, DbCollector] = {}


def register_collector(fn: Collector) -> None:
    _COLLECTORS[f"{fn.__module__}.{fn.__qualname__}"] = fn


def register_db_collector(fn: DbCollector) -> None:
    """`fn(session)` runs in its own session at each scrape."""
    _DB_COLLECTORS[f"{fn.__module__}.{fn.__qualname__}"] = fn


def collect(factory: sessionmaker[Session]) -> None:
    errors = sum(_safely(partial(_in_session, fn, factory), fn.__qualname__) for fn in _DB_COLLECTORS.values())
    errors += sum(_safely(fn, fn.__qualname__) for fn in _COLLECTORS.values())
    SCRAPE_ERRORS.set(errors)


def _in_session(fn: DbCollector, factory: sessionmaker[Session]) -> None:
    with factory() as session:
        fn(session)


def _safely(fn: Collector, name: str) -> int:
    """Run one collector; a failure costs only its values."""
    try:
        fn()
        return 0
    except Exception:
        log.warning("metrics collector %s failed", name, exc_info=True)
        return 1


# --- wiring -----------------------------------------------------------------------------------

router = APIRouter(tags=["metrics"])


def require_metrics_access(request: Request) -> None:
    settings = get_settings()
    if settings.metrics_public:
        return
    if not settings.operator_token:
        raise NotFound("Not found")  # off: nothing tells a scanner it exists
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.operator_token.encode()):
        err = AuthenticationError("/metrics needs the operator token as 'Authorization: Bearer <token>'.",
                                  code="invalid_operator_token")
        err.headers = {"WWW-Authenticate": "Bearer"}
        raise err


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(require_metrics_access)])
def metrics(request: Request) -> Response:
    collect(getattr(request.app.state, "sessionmaker", None) or get_sessionmaker())
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def install_metrics(app: FastAPI) -> None:
    app.add_middleware(MetricsMiddleware)
    app.include_router(router)
