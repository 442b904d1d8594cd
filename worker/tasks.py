"""Celery tasks: the worker processes' entry points. Thin wrappers that take ids and call the
domain code, which owns its transactions."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from typing import Any

from celery.concurrency.solo import TaskPool as SoloPool
from celery.signals import worker_ready

from app.jobs import cleanup, exports, runner
from app.kit.broker import RUN_JOB_TASK, get_celery
from app.webhooks.service import TASK_NAME as WEBHOOK_TASK
from app.webhooks.service import Delivery, deliver, send_delivery
from worker.heartbeat import heartbeats

celery = get_celery()
SOLO_POOL = threading.Event()  # set in a solo-pool worker, whose tasks block Celery's own heartbeats


def worker_id() -> str:
    """Unique per run: the lease owner is this process and this delivery."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@celery.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str | None = None) -> str:
    """A claim token: runs the next job in fair order; `job_id` (who sent it) is only for logs."""
    with heartbeats(celery, run_job.request.hostname if SOLO_POOL.is_set() else None):
        return runner.run_next(worker_id())


@worker_ready.connect
def _note_pool(sender: Any = None, **_: object) -> None:
    if isinstance(getattr(sender, "pool", None), SoloPool):
        SOLO_POOL.set()


@worker_ready.connect
def _clean_leftovers(**_: object) -> None:
    """Scratch and orphaned bytes a killed worker left behind (app.jobs.cleanup), swept beside the
    worker: a long listing of object storage never delays its first job."""
    threading.Thread(target=cleanup.run_safely, name="cleanup", daemon=True).start()


@celery.task(name=WEBHOOK_TASK, acks_late=True)
def deliver_webhook(job_id: str, url: str, event_id: str, body: str, attempt: int = 1) -> str:
    delivery = Delivery(job_id, url, event_id, body, attempt)
    retry_in = deliver(delivery)
    if retry_in is None:
        return "done"
    send_delivery(delivery.next(), countdown=retry_in)
    return f"retry in {retry_in:.0f}s"


@celery.task(name=exports.EXPORT_TASK, acks_late=True, reject_on_worker_lost=True)
def build_export(export_id: str) -> str:
    with heartbeats(celery, build_export.request.hostname if SOLO_POOL.is_set() else None):
        return exports.build_export(export_id)
