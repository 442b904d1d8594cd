"""Enqueue after commit, pass ids. The job id is the Celery task id; duplicates are harmless
because workers claim jobs with a conditional update."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from app.kit.broker import RUN_JOB_TASK, get_celery
from app.kit.db import after_commit

log = logging.getLogger(__name__)


def send_run_job(job_id: str) -> None:
    try:
        get_celery().send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id)
    except Exception:  # the reaper re-enqueues queued jobs whose message was lost
        log.exception("could not enqueue job; the reaper will retry", extra={"job_id": job_id})


def enqueue_job(session: Session, job_id: str) -> None:
    after_commit(session, lambda: send_run_job(job_id))
