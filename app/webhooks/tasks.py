"""Celery task for webhook delivery (queue `default`). Add "app.webhooks.tasks" to the Celery
`include` list so workers register it."""

from __future__ import annotations

from app.webhooks.service import TASK_NAME, Delivery, deliver, send_delivery
from worker.celery_app import get_celery


@get_celery().task(name=TASK_NAME, acks_late=True)  # type: ignore[untyped-decorator]
def deliver_webhook(job_id: str, url: str, event_id: str, body: str, attempt: int = 1) -> str:
    delivery = Delivery(job_id, url, event_id, body, attempt)
    retry_in = deliver(delivery)
    if retry_in is None:
        return "done"
    send_delivery(delivery.next(), countdown=retry_in)
    return f"retry in {retry_in:.0f}s"
