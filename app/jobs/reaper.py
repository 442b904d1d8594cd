"""The reaper: re-queues jobs whose worker died (lease expired) so they resume from their last
checkpoint, fails them after `max_attempts`, and replaces lost claim tokens (a Redis restart, an
embedded worker killed holding one) by topping the training queue up to one token per claimable
job; it never adds to a queue that already holds enough, however long jobs wait. Its thread also
sweeps leftovers (app.jobs.cleanup). Safe to run anywhere, any number of times: updates are
conditional and a surplus token is harmless."""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.jobs import cleanup
from app.jobs.events import add_event
from app.jobs.gang import sweep_seats
from app.jobs.queue import top_up
from app.jobs.state import JobStatus, transition
from app.kit.db import session_scope, utcnow
from app.orm import Job
from app.settings import get_settings
from app.webhooks.service import notify_terminal

log = logging.getLogger(__name__)


def _expired(s: Session, job: Job) -> None:
    now = utcnow()
    if job.pause_requested:
        _pause_for_lost_worker(s, job)
        return
    # Still running under the same expired lease (a heartbeat or a settling write may have come since),
    # and no pause asked meanwhile (the next pass honours it).
    cond = (Job.lease_expires_at < now, Job.pause_requested.is_(False))
    running, owner = {JobStatus.running}, job.lease_owner
    if job.attempt >= job.max_attempts:
        msg = (f"The worker running this job stopped responding on {job.attempt} attempts; giving up "
               f"(max_attempts={job.max_attempts}).")
        if transition(s, job.id, to=JobStatus.failed, from_=running, owner=owner, where=cond,
                      error={"code": "worker_lost", "message": msg, "param": None}):
            add_event(s, job.id, msg, level="error")
            notify_terminal(s, job.id)
        return
    # It keeps its place in the queue (ordered by creation); the pass's top-up sends its token.
    if transition(s, job.id, to=JobStatus.queued, from_=running, owner=owner, where=cond, enqueued_at=now):
        add_event(s, job.id, f"Worker lost on attempt {job.attempt} (lease expired); re-queued to resume "
                             "from the last checkpoint", level="warn")


def _pause_for_lost_worker(s: Session, job: Job) -> None:
    """The user asked for a pause and the worker died before acting on it: honour the pause (the job
    waits, paused, at its last checkpoint) instead of re-running it. Like any pause, it gives the
    attempt back, so a paused job can always be resumed."""
    if transition(s, job.id, to=JobStatus.paused, from_={JobStatus.running}, owner=job.lease_owner,
                  where=(Job.lease_expires_at < utcnow(), Job.pause_requested.is_(True)),
                  pause_requested=False, attempt=Job.attempt - 1):
        add_event(s, job.id, "Job paused as requested: its worker stopped before acting on the pause; "
                             "resume continues from the last checkpoint", level="warn")


def reap_once() -> dict[str, int]:
    now = utcnow()
    with session_scope() as s:
        expired = list(s.scalars(select(Job).where(Job.status == JobStatus.running, Job.lease_expires_at < now)))
        for job in expired:
            _expired(s, job)
        sweep_seats(s)  # gang seats of attempts that are over (a leader that died before closing them)
    resent = top_up()  # after the commit: re-queued jobs count
    if expired or resent:
        log.info("reaper: %d expired, %d claim tokens re-sent", len(expired), resent)
    return {"expired": len(expired), "resent": resent}


class ReaperThread(threading.Thread):
    """Runs the reaper in-process (API server, embedded mode)."""

    def __init__(self, interval: float | None = None) -> None:
        super().__init__(name="reaper", daemon=True)
        self.interval = interval or get_settings().reaper_interval_seconds
        self.stop_event = threading.Event()

    def run(self) -> None:
        cleanup.run_safely()  # start-up: what a killed process left behind
        last_cleanup = time.monotonic()
        while not self.stop_event.wait(self.interval):
            try:
                reap_once()
            except Exception:
                log.exception("reaper pass failed")
            if time.monotonic() - last_cleanup >= get_settings().cleanup_interval_seconds:
                cleanup.run_safely()
                last_cleanup = time.monotonic()
