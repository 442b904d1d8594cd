"""Entry point for `celery -A worker.celery_app:app worker`: the Celery app of `app.kit.broker`,
with the task modules of `worker/tasks.py` registered."""

from __future__ import annotations

from app.kit.broker import get_celery

app = get_celery()
