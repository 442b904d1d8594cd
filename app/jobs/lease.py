"""Claiming jobs and holding them: a conditional update claims, a lease renewed by a heartbeat
thread holds. Exactly-once in effect: a duplicate delivery finds nothing to claim."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import or_, select, update

from app.kit.db import session_scope, utcnow
from app.orm import Job
from app.settings import get_settings
from ml.config import Interrupt

log = logging.getLogger(__name__)

CLAIMABLE = ("queued", "validating_files")


@dataclass
class Claim:
    job_id: str
    worker_id: str
    attempt: int


def claim(job_id: str, worker_id: str) -> Claim | None:
    """Take the job if it is queued, or running with an expired lease (its worker died)."""
    now = utcnow()
    lease = timedelta(seconds=get_settings().lease_seconds)
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.attempt < Job.max_attempts,
               or_(Job.status.in_(CLAIMABLE), (Job.status == "running") & (Job.lease_expires_at < now)))
        .values(status="running", lease_owner=worker_id, lease_expires_at=now + lease, heartbeat_at=now,
                attempt=Job.attempt + 1, pause_requested=False)
        .returning(Job.attempt)
    )
    with session_scope() as s:
        attempt = s.execute(stmt).scalar_one_or_none()
        if attempt is not None:
            job = s.get(Job, job_id)
            if job is not None and job.started_at is None:
                job.started_at = now
    return Claim(job_id, worker_id, attempt) if attempt is not None else None


def owned(s_job: Job | None, worker_id: str) -> bool:
    return s_job is not None and s_job.status == "running" and s_job.lease_owner == worker_id


class Heartbeat:
    """Renews the lease every `heartbeat_seconds` and polls for cancel/pause about every second.
    `interrupt` tells the training loop to stop (cancelled, paused, or the lease was lost)."""

    def __init__(self, claim: Claim, poll_seconds: float = 1.0) -> None:
        self.claim = claim
        self.settings = get_settings()
        self.poll = min(poll_seconds, self.settings.heartbeat_seconds)
        self.interrupt: Interrupt | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{claim.job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        last_renew = 0.0
        while not self._stop.wait(self.poll):
            try:
                now = utcnow().timestamp()
                if now - last_renew >= self.settings.heartbeat_seconds:
                    self._renew()
                    last_renew = now
                self._poll_flags()
            except Exception:  # a DB blip must not kill training; the lease has slack
                log.exception("heartbeat failed", extra={"job_id": self.claim.job_id})

    def _renew(self) -> None:
        now = utcnow()
        with session_scope() as s:
            res = s.execute(update(Job).where(
                Job.id == self.claim.job_id, Job.lease_owner == self.claim.worker_id, Job.status == "running",
            ).values(lease_expires_at=now + timedelta(seconds=self.settings.lease_seconds), heartbeat_at=now))
            if res.rowcount == 0 and self.interrupt is None:  # type: ignore[attr-defined]
                self._poll_flags()
                self.interrupt = self.interrupt or Interrupt.lease_lost

    def _poll_flags(self) -> None:
        with session_scope() as s:
            row = s.execute(select(Job.status, Job.lease_owner, Job.pause_requested).where(
                Job.id == self.claim.job_id)).first()
        if row is None or row.status == "cancelled":
            self.interrupt = Interrupt.cancelled
        elif row.status != "running" or row.lease_owner != self.claim.worker_id:
            self.interrupt = Interrupt.lease_lost
        elif row.pause_requested:
            self.interrupt = Interrupt.paused
