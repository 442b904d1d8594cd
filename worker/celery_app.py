"""Celery on Redis (or, embedded, a filesystem broker under data_dir). Job state lives in the
database; Celery only carries job ids. No result backend. Queues: `training` (one job per worker
process: one per GPU) and `default` (reaper, webhooks). Inference does not go through Celery: the API
runs the engine in-process or forwards to inference workers (worker/inference_server.py)."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from kombu import Queue

from app.settings import Settings, get_settings

TRAINING_QUEUE = "training"
DEFAULT_QUEUE = "default"


def make_celery(settings: Settings) -> Celery:
    app = Celery("tunehouse", broker=settings.resolved_broker_url, include=["worker.tasks", "app.webhooks.tasks"])
    transport: dict[str, object] = {"visibility_timeout": settings.visibility_timeout_seconds}
    if settings.embedded:
        d = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        transport |= {"data_folder_in": str(d / "queue"), "data_folder_out": str(d / "queue"),
                      "processed_folder": str(d / "processed"), "store_processed": False,
                      "control_folder": str(d / "control")}
    app.conf.update(
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=DEFAULT_QUEUE,
        task_queues=[Queue(TRAINING_QUEUE), Queue(DEFAULT_QUEUE)],
        task_routes={
            "tunehouse.run_job": {"queue": TRAINING_QUEUE},
        },
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        beat_schedule={
            "reap-expired-leases": {"task": "tunehouse.reap", "schedule": settings.reaper_interval_seconds},
        },
    )
    return app


@lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def broker_ok() -> bool:
    try:
        with get_celery().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:
        return False


def __getattr__(name: str) -> Celery:
    # `celery -A worker.celery_app:app worker` builds the app on first access.
    if name == "app":
        return get_celery()
    raise AttributeError(name)
