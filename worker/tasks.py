"""Celery tasks: the worker processes' entry points. Thin wrappers that take ids and call the
domain code, which owns its transactions."""

from __future__ import annotations

import os
import socket
import uuid

from app.jobs import exports, runner
from app.kit.broker import RUN_JOB_TASK, get_celery
from app.webhooks.service import TASK_NAME as WEBHOOK_TASK
from app.webhooks.service import Delivery, deliver, send_delivery

celery = get_celery()


def worker_id() -> str:
    """Unique per run: the lease owner is this process and this delivery."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@celery.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> str:
    return runner.run_job(job_id, worker_id())


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
    return exports.build_export(export_id)
