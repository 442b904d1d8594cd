"""The jobs domain's scrape-time metrics: jobs by status, broker queue depth and the training
tokens/s of running jobs. `register()` hands them to the `/metrics` route of `app.kit.metrics`."""

from __future__ import annotations

from prometheus_client import Gauge
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.jobs.state import JobStatus
from app.kit.broker import DEFAULT_QUEUE, TRAINING_QUEUE
from app.kit.metrics import REGISTRY, register_collector, register_db_collector
from app.orm import Job, JobEvent
from app.settings import get_settings

QUEUES = (TRAINING_QUEUE, DEFAULT_QUEUE)

JOBS = Gauge("tunehouse_jobs", "Fine-tuning jobs by status", ["status"], registry=REGISTRY)
QUEUE_DEPTH = Gauge("tunehouse_queue_depth", "Messages waiting in a broker queue (Redis only)", ["queue"],
                    registry=REGISTRY)
TOKENS_PER_SECOND = Gauge("tunehouse_training_tokens_per_second", "Training throughput of a running job",
                          ["job_id", "model"], registry=REGISTRY)


def collect_jobs(session: Session) -> None:
    counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).tuples().all())
    for status in {*JobStatus, *counts}:
        JOBS.labels(str(status)).set(counts.get(status, 0))


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
    for job in session.scalars(select(Job).where(Job.status == JobStatus.running)):
        value = _latest_tokens_per_second(session, job)
        if value is not None:
            TOKENS_PER_SECOND.labels(job.id, job.model).set(value)


def register() -> None:
    register_db_collector(collect_jobs)
    register_db_collector(collect_tokens_per_second)
    register_collector(collect_queue_depth)
