"""Terminal-status webhooks, signed in the Standard Webhooks style.

`notify_terminal(session, job_id)` snapshots the event inside the caller's transaction and, once it
commits, sends the `tunehouse.deliver_webhook` task. Every attempt POSTs the same bytes with the
same `webhook-id` (receivers dedupe on it), is recorded as a job event, and failures are retried
with exponential backoff up to `settings.webhook_max_attempts`.

Only URLs `app.webhooks.urls` accepts are called (checked at creation and before each attempt),
webhooks need `settings.webhook_secret`, and the tenant's events say only whether an attempt was
delivered; the log keeps status codes and errors.

Signature: `webhook-signature: v1,<base64(HMAC-SHA256(secret, "<webhook-id>.<webhook-timestamp>.<body>"))>`.
A secret written `whsec_<base64>` is base64-decoded first, as Standard Webhooks libraries do."""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.jobs.events import add_event
from app.jobs.state import TERMINAL
from app.kit import ids
from app.kit.broker import DEFAULT_QUEUE, get_celery
from app.kit.db import after_commit, session_scope
from app.kit.errors import InvalidRequest
from app.orm import Job
from app.settings import get_settings
from app.webhooks import urls

log = logging.getLogger(__name__)

TASK_NAME = "tunehouse.deliver_webhook"
TIMEOUT_SECONDS = 10.0
BACKOFF_BASE_SECONDS = 10.0
BACKOFF_MAX_SECONDS = 3600.0
TOLERANCE_SECONDS = 300


@dataclass(frozen=True)
class Delivery:
    """One webhook event; the task's arguments (JSON-serialisable)."""

    job_id: str
    url: str
    event_id: str
    body: str
    attempt: int = 1

    def next(self) -> Delivery:
        return Delivery(self.job_id, self.url, self.event_id, self.body, self.attempt + 1)


# --- signing ------------------------------------------------------------------------------------

def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()


def signed_content(msg_id: str, timestamp: int, body: str) -> bytes:
    """Standard Webhooks: HMAC-SHA256 over `<webhook-id>.<webhook-timestamp>.<body>`."""
    return f"{msg_id}.{timestamp}.{body}".encode()


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    digest = hmac.new(_key(secret), signed_content(msg_id, timestamp, body), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers_for(delivery: Delivery, secret: str, now: int | None = None) -> dict[str, str]:
    timestamp = int(now if now is not None else time.time())
    headers = {"content-type": "application/json", "user-agent": "tunehouse-webhooks/1",
               "webhook-id": delivery.event_id, "webhook-timestamp": str(timestamp)}
    if secret:
        headers["webhook-signature"] = sign(secret, delivery.event_id, timestamp, delivery.body)
    return headers


def verify(secret: str, headers: Mapping[str, str], body: str, now: float | None = None,
           tolerance: int = TOLERANCE_SECONDS) -> bool:
    """Receiver side: a valid `v1` signature over a timestamp within `tolerance` seconds."""
    try:
        timestamp = int(headers["webhook-timestamp"])
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > tolerance:
        return False
    expected = sign(secret, headers.get("webhook-id", ""), timestamp, body)
    offered = headers.get("webhook-signature", "").split()
    return any(hmac.compare_digest(sig, expected) for sig in offered)


# --- job creation -------------------------------------------------------------------------------

def validate_webhook_url(url: str | None) -> None:
    """A job's webhook: 400 unless the operator set a signing secret and `urls.check` accepts the URL.
    The message never says what the host resolved to."""
    if url is None:
        return
    settings = get_settings()
    if not settings.webhook_secret:
        raise InvalidRequest("Webhooks are disabled on this server: the operator must set TUNEHOUSE_WEBHOOK_SECRET "
                             "so that events are signed.", param="webhook_url", code="webhook_secret_missing")
    try:
        urls.check(url, settings)
    except urls.UnsafeWebhookUrl as exc:
        raise InvalidRequest(exc.public, param="webhook_url", code="invalid_webhook_url") from None


# --- the event ----------------------------------------------------------------------------------

def build_event(job_id: str, status: str, fine_tuned_model: str | None,
                error: dict[str, Any] | None) -> tuple[str, str]:
    """(event id, JSON body) for a job that reached `status`."""
    event_id = ids.new_id("whevt")
    payload = {
        "id": event_id, "object": "event", "type": f"fine_tuning.job.{status}",
        "created_at": int(time.time()),
        "data": {"id": job_id, "status": status, "fine_tuned_model": fine_tuned_model, "error": error},
    }
    return event_id, json.dumps(payload, separators=(",", ":"))


def notify_terminal(session: Session, job_id: str) -> None:
    """Call in the transaction that moves a job to succeeded/failed/cancelled. Reads the job as
    this transaction sees it (ORM or bulk updates alike) and sends the task after commit only."""
    row = session.execute(select(Job.status, Job.fine_tuned_model, Job.error, Job.webhook_url)
                          .where(Job.id == job_id)).first()
    if row is None or not row.webhook_url:
        return
    if row.status not in TERMINAL:
        log.warning("notify_terminal on a %s job; no webhook sent", row.status, extra={"job_id": job_id})
        return
    event_id, body = build_event(job_id, row.status, row.fine_tuned_model, row.error)
    delivery = Delivery(job_id, row.webhook_url, event_id, body)
    after_commit(session, lambda: send_delivery(delivery))


def send_delivery(delivery: Delivery, countdown: float | None = None) -> None:
    try:
        get_celery().send_task(TASK_NAME, kwargs=asdict(delivery), queue=DEFAULT_QUEUE, countdown=countdown)
    except Exception:
        log.exception("could not enqueue webhook delivery", extra={"job_id": delivery.job_id})


# --- delivery -----------------------------------------------------------------------------------

class Outcome(enum.Enum):
    delivered = "delivered"
    failed = "not_delivered"  # worth retrying
    refused = "refused"  # by policy or by the receiver (410): never retried


def backoff_seconds(attempt: int) -> float:
    """Delay after failed attempt `attempt` (1-based): 10 s, 20 s, 40 s ... capped at an hour."""
    return float(min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (attempt - 1)))


def _post(target: urls.Target, delivery: Delivery, secret: str) -> int | None:
    """The response status, or None when there was none. Sent to the checked address with the
    name in Host (and SNI); no redirects followed, no proxy from the environment, the body unread."""
    headers = headers_for(delivery, secret) | {"host": target.host_header}
    try:
        with httpx.Client(timeout=TIMEOUT_SECONDS, follow_redirects=False, trust_env=False) as client:
            request = client.build_request("POST", target.pinned_url, content=delivery.body.encode(),
                                           headers=headers, extensions=target.extensions)
            response = client.send(request, stream=True)
            response.close()
            return response.status_code
    except httpx.HTTPError as exc:
        log.info("webhook attempt %d to %s (%s) failed: %s: %s", delivery.attempt, target.host_header,
                 target.address, type(exc).__name__, exc, extra={"job_id": delivery.job_id})
        return None


def _attempt(delivery: Delivery) -> Outcome:
    """Check the URL again (its name may now resolve inside), then send. Details go to the log only."""
    settings = get_settings()
    extra = {"job_id": delivery.job_id}
    if not settings.webhook_secret:
        log.error("webhook not sent: TUNEHOUSE_WEBHOOK_SECRET is not set", extra=extra)
        return Outcome.refused
    try:
        target = urls.check(delivery.url, settings)
    except urls.UnsafeWebhookUrl as exc:
        log.warning("webhook attempt %d not sent: %s", delivery.attempt, exc, extra=extra)
        return Outcome.failed if exc.transient else Outcome.refused
    status = _post(target, delivery, settings.webhook_secret)
    if status is not None:
        log.info("webhook attempt %d to %s (%s): HTTP %d", delivery.attempt, target.host_header,
                 target.address, status, extra=extra)
    if status is not None and 200 <= status < 300:
        return Outcome.delivered
    return Outcome.refused if status == 410 else Outcome.failed


def _record(delivery: Delivery, delivered: bool, retry_in: float | None) -> None:
    """The tenant's event: the outcome only. Status codes, errors and addresses would make the
    service a scanner of whatever the URL reaches."""
    then = "" if delivered else (f"; retrying in {retry_in:.0f} s" if retry_in is not None else "; giving up")
    text = "delivered" if delivered else "not delivered"
    data = {"webhook": {"event_id": delivery.event_id, "attempt": delivery.attempt, "delivered": delivered,
                        "retry_in_seconds": retry_in}}
    try:
        with session_scope() as s:
            add_event(s, delivery.job_id, f"Webhook attempt {delivery.attempt}: {text}{then}",
                      level="info" if delivered else "warn", data=data)
    except Exception:  # the job may be gone; the delivery outcome stands
        log.warning("could not record webhook attempt", exc_info=True, extra={"job_id": delivery.job_id})


def deliver(delivery: Delivery) -> float | None:
    """One attempt. Returns the delay before the next attempt, or None when done (delivered, refused
    by policy or with 410 Gone, or out of attempts)."""
    outcome = _attempt(delivery)
    retry_in = None if outcome is not Outcome.failed or delivery.attempt >= get_settings().webhook_max_attempts \
        else backoff_seconds(delivery.attempt)
    _record(delivery, outcome is Outcome.delivered, retry_in)
    return retry_in
