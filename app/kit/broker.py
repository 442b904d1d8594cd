"""Celery on Redis (or, embedded, a filesystem broker under data_dir). Job state lives in the
database; Celery only carries ids. No result backend. Queues: `training` (one job per worker process:
one per GPU) and `default` (webhooks, weight exports). Inference does not go through Celery: the API
forwards to inference workers (worker/inference_server.py). The tasks themselves are entry points in
`worker/tasks.py`; the API only sends them by name."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from kombu import Queue

from app.settings import Settings, get_settings

TRAINING_QUEUE = "training"
DEFAULT_QUEUE = "default"
RUN_JOB_TASK = "tunehouse.run_job"


def make_celery(settings: Settings) -> Celery:
    app = Celery("tunehouse", broker=settings.resolved_broker_url, include=["worker.tasks"])
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
        task_routes={RUN_JOB_TASK: {"queue": TRAINING_QUEUE}},
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        # Task events let Flower show queued and running tasks. Redis only: the embedded filesystem
        # broker has no fanout exchange to publish them on.
        worker_send_task_events=not settings.embedded,
        task_send_sent_event=not settings.embedded,
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

