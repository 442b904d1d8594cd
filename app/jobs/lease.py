"""Claiming jobs and holding them: a conditional update claims, a lease renewed by a heartbeat
thread holds. Exactly-once in effect: a duplicate delivery finds nothing to claim (or, as a
claim token, the next job, whose own token is then the surplus one)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from app.jobs.queue import Head, claim_order, running_limit
from app.jobs.state import CLAIMABLE, JobStatus, transition
from app.kit.db import session_scope, utcnow
from app.orm import Job, Project
from app.settings import get_settings
from ml.config import Interrupt

log = logging.getLogger(__name__)


@dataclass
class Claim:
    job_id: str
    worker_id: str
    attempt: int


def _claimable_now(now: datetime) -> list[ColumnElement[bool]]:
    """Attempts left, and a running job only once its lease ran out (its worker died) and no pause was
    asked for (the reaper pauses such a job instead: a requested pause is never lost)."""
    expired = and_(Job.lease_expires_at < now, Job.pause_requested.is_(False))
    return [Job.attempt < Job.max_attempts, or_(Job.status != JobStatus.running, expired)]


def _take(s: Session, job_id: str, worker_id: str, from_: set[JobStatus]) -> int | None:
    """The claiming update; the attempt it starts, or None when the job was not there to take."""
    now = utcnow()
    lease = timedelta(seconds=get_settings().lease_seconds)
    if not transition(s, job_id, to=JobStatus.running, from_=from_, where=_claimable_now(now),
                      lease_owner=worker_id, lease_expires_at=now + lease, heartbeat_at=now,
                      attempt=Job.attempt + 1, pause_requested=False, started_at=func.coalesce(Job.started_at, now)):
        return None
    return s.scalar(select(Job.attempt).where(Job.id == job_id))  # our update holds the row lock


def claim(job_id: str, worker_id: str) -> Claim | None:
    """Take this job if it is queued, or running with an expired lease (its worker died)."""
    with session_scope() as s:
        attempt = _take(s, job_id, worker_id, set(CLAIMABLE | {JobStatus.running}))
    return None if attempt is None else Claim(job_id, worker_id, attempt)


def claim_next(worker_id: str, rounds: int = 8, devices: int | None = None) -> Claim | None:
    """What a `run_job` token does: take the next queued job in fair order (`queue.claim_order`)
    whose project is under its running limit and whose devices per node this worker holds (`devices`,
    default TUNEHOUSE_WORKER_DEVICES). Losing a head to another worker re-reads the order."""
    devices = get_settings().worker_devices if devices is None else devices
    for _ in range(rounds):
        with session_scope() as s:
            heads = claim_order(s, devices)
        raced = False
        for head in heads:
            got = _claim_head(head, worker_id)
            if isinstance(got, Claim):
                return got
            if got == "raced":
                raced = True
                break
        if not raced:
            return None  # nothing queued, or every project with queued jobs is at its limit
    return None


def _claim_head(head: Head, worker_id: str) -> Claim | Literal["full", "raced"]:
    with session_scope() as s:
        limit = running_limit(head.project_id, s)
        if limit is not None and not _slot_free(s, head.project_id, limit):
            return "full"
        attempt = _take(s, head.job_id, worker_id, {JobStatus.queued})
    return "raced" if attempt is None else Claim(head.job_id, worker_id, attempt)


def _slot_free(s: Session, project_id: str, limit: int) -> bool:
    """Claims of one project queue up on its row lock, so two workers never both take its last free
    slot (Postgres; SQLite ignores the lock, but embedded mode runs a single training worker)."""
    s.execute(select(Project.id).where(Project.id == project_id).with_for_update())
    running = s.scalar(select(func.count()).select_from(Job).where(
        Job.project_id == project_id, Job.status == JobStatus.running))
    return int(running or 0) < limit


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
            renewed = transition(s, self.claim.job_id, to=None, from_={JobStatus.running},
                                 owner=self.claim.worker_id, heartbeat_at=now,
                                 lease_expires_at=now + timedelta(seconds=self.settings.lease_seconds))
        if not renewed and self.interrupt is None:
            self._poll_flags()
            self.interrupt = self.interrupt or Interrupt.lease_lost

    def _poll_flags(self) -> None:
        with session_scope() as s:
            row = s.execute(select(Job.status, Job.lease_owner, Job.pause_requested).where(
                Job.id == self.claim.job_id)).first()
        if row is None or row.status == JobStatus.cancelled:
            self.interrupt = Interrupt.cancelled
        elif row.status != JobStatus.running or row.lease_owner != self.claim.worker_id:
            self.interrupt = Interrupt.lease_lost
        elif row.pause_requested:
            self.interrupt = Interrupt.paused
