"""Celery task wrappers: thin, pass ids. The task id is the job id."""

from __future__ import annotations

import os
import socket
import uuid

from worker import reaper, runner
from worker.celery_app import get_celery

celery = get_celery()


def worker_id() -> str:
    """Unique per run: the lease owner is this process and this delivery."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@celery.task(name="tunehouse.run_job", acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> str:
    return runner.run_job(job_id, worker_id())


@celery.task(name="tunehouse.reap")
def reap() -> dict[str, int]:
    return reaper.reap_once()
