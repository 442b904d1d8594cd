"""Prometheus `/metrics`: request latency by route template and status (middleware), plus values
read at scrape time: jobs by status, broker queue depth, training tokens/s of running jobs, and
the process's CPU and memory. Enable with `install_metrics(app)`."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.kit.db import get_sessionmaker
from app.orm import Job, JobEvent
from app.settings import get_settings

log = logging.getLogger(__name__)

JOB_STATUSES = ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled")
QUEUES = ("training", "default")

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes, ...

REQUEST_SECONDS = Histogram(
    "tunehouse_http_request_duration_seconds", "HTTP request latency (streams: until the stream ends)",
    ["method", "route", "status"], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
JOBS = Gauge("tunehouse_jobs", "Fine-tuning jobs by status", ["status"], registry=REGISTRY)
QUEUE_DEPTH = Gauge("tunehouse_queue_depth", "Messages waiting in a broker queue (Redis only)", ["queue"],
                    registry=REGISTRY)
TOKENS_PER_SECOND = Gauge("tunehouse_training_tokens_per_second", "Training throughput of a running job",
                          ["job_id", "model"], registry=REGISTRY)
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

def collect_jobs(session: Session) -> None:
    counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).tuples().all())
    for status in {*JOB_STATUSES, *counts}:
        JOBS.labels(status).set(counts.get(status, 0))


def collect_queue_depth() -> None:
    """LLEN of each queue's Redis list; nothing in embedded mode (filesystem broker)."""
    settings = get_settings()
    if settings.embedded or not settings.broker_url.startswith(("redis://", "rediss://")):
        return
    import redis

    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=1, socket_timeout=1)
    try:
        for queue in QUEUES:
            QUEUE_DEPTH.labels(queue).set(int(client.llen(queue)))
    finally:
        client.close()


def _latest_tokens_per_second(session: Session, job: Job) -> float | None:
    if isinstance((job.progress or {}).get("tokens_per_second"), int | float):
        return float(job.progress["tokens_per_second"])
    stmt = (select(JobEvent.data).where(JobEvent.job_id == job.id, JobEvent.type == "metrics")
            .order_by(JobEvent.seq.desc()).limit(20))
    for data in session.scalars(stmt):
        value = (data or {}).get("tokens_per_second")
        if isinstance(value, int | float):
            return float(value)
    return None


def collect_tokens_per_second(session: Session) -> None:
    TOKENS_PER_SECOND.clear()  # finished jobs drop out
    for job in session.scalars(select(Job).where(Job.status == "running")):
        value = _latest_tokens_per_second(session, job)
        if value is not None:
            TOKENS_PER_SECOND.labels(job.id, job.model).set(value)


def collect(factory: sessionmaker[Session]) -> None:
    errors = sum(_safely(fn, factory) for fn in (collect_jobs, collect_tokens_per_second))
    errors += _safely(collect_queue_depth)
    SCRAPE_ERRORS.set(errors)


def _safely(fn: Any, factory: sessionmaker[Session] | None = None) -> int:
    """Run one collector (in its own session if it reads the DB); a failure costs only its values."""
    try:
        if factory is None:
            fn()
        else:
            with factory() as session:
                fn(session)
        return 0
    except Exception:
        log.warning("metrics collector %s failed", fn.__name__, exc_info=True)
        return 1


# --- wiring -----------------------------------------------------------------------------------

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    collect(getattr(request.app.state, "sessionmaker", None) or get_sessionmaker())
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def install_metrics(app: FastAPI) -> None:
    app.add_middleware(MetricsMiddleware)
    app.include_router(router)
