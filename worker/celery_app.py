"""Entry point for `celery -A worker.celery_app:app worker`: the Celery app of `app.kit.broker`,
with the task modules of `worker/tasks.py` registered, logging through `app.kit.logging` (JSON lines,
like the API) instead of Celery's own formats."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import setup_logging

from app.kit.broker import get_celery
from app.kit.logging import configure_logging
from app.settings import get_settings

app = get_celery()  # its conf has worker_hijack_root_logger=False
configure_logging(get_settings())  # already at import: Celery warns (e.g. running as root) before set-up


@setup_logging.connect
def _configure_logging(loglevel: int | str | None = None, **_: Any) -> None:
    """Connected, this replaces Celery's whole logging set-up (root, task and redirect loggers)."""
    configure_logging(get_settings())
    logging.getLogger().setLevel(loglevel or logging.INFO)  # the worker's `-l`
