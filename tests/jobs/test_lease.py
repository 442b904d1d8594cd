"""Claims, leases, heartbeats and the reaper against the real database."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.jobs import reaper
from app.jobs.lease import Heartbeat, claim
from app.jobs.runner import run_job
from app.kit.db import utcnow
from app.orm import Job, JobEvent
from app.settings import get_settings
from ml.config import Interrupt
from tests.jobs.worker_factories import committed_job


@pytest.fixture
def fast_leases() -> Iterator[None]:
    s = get_settings()
    saved = (s.lease_seconds, s.heartbeat_seconds)
    s.lease_seconds, s.heartbeat_seconds = 2.0, 0.2
    yield
    s.lease_seconds, s.heartbeat_seconds = saved


def _job(factory: sessionmaker[Session], job_id: str) -> Job:
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def test_claim_once_duplicate_delivery_is_noop(committed_db: sessionmaker[Session]) -> None:
    job_id = committed_job(committed_db)
    first = claim(job_id, "w1")
    assert first is not None and first.attempt == 1
    assert claim(job_id, "w2") is None  # a second delivery of the same task
    assert run_job(job_id, "w3") == "skipped"
    job = _job(committed_db, job_id)
    assert (job.status, job.lease_owner, job.attempt) == ("running", "w1", 1)
    assert job.started_at is not None


def test_heartbeat_renews_and_sees_cancel(committed_db: sessionmaker[Session], fast_leases: None) -> None:
    job_id = committed_job(committed_db)
    got = claim(job_id, "w1")
    assert got is not None
    before = _job(committed_db, job_id).lease_expires_at
    with Heartbeat(got, poll_seconds=0.1) as hb:
        time.sleep(0.6)
        assert _job(committed_db, job_id).lease_expires_at > before  # type: ignore[operator]
        with committed_db.begin() as s:
            s.execute(update(Job).where(Job.id == job_id).values(status="cancelled"))
        deadline = time.monotonic() + 3
        while hb.interrupt is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hb.interrupt is Interrupt.cancelled


def test_heartbeat_sees_pause_and_lost_lease(committed_db: sessionmaker[Session], fast_leases: None) -> None:
    job_id = committed_job(committed_db)
    got = claim(job_id, "w1")
    assert got is not None
    with Heartbeat(got, poll_seconds=0.1) as hb:
        with committed_db.begin() as s:
            s.execute(update(Job).where(Job.id == job_id).values(pause_requested=True))
        time.sleep(0.4)
        assert hb.interrupt is Interrupt.paused
        with committed_db.begin() as s:
            s.execute(update(Job).where(Job.id == job_id).values(lease_owner="someone-else"))
        time.sleep(0.4)
        assert hb.interrupt is Interrupt.lease_lost


def test_reaper_requeues_expired_lease_then_fails_after_max_attempts(
        committed_db: sessionmaker[Session]) -> None:
    job_id = committed_job(committed_db, max_attempts=2)
    for attempt in (1, 2):
        got = claim(job_id, f"w{attempt}")
        assert got is not None and got.attempt == attempt
        with committed_db.begin() as s:  # the worker died: its lease runs out
            s.execute(update(Job).where(Job.id == job_id).values(
                lease_expires_at=utcnow() - timedelta(seconds=1)))
        assert reaper.reap_once()["expired"] == 1
    job = _job(committed_db, job_id)
    assert job.status == "failed" and job.error and job.error["code"] == "worker_lost"
    with committed_db() as s:
        messages = [e.message for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id))]
    assert any("re-queued" in m for m in messages)
    assert any("giving up" in m for m in messages)


def test_expired_lease_can_be_claimed_directly(committed_db: sessionmaker[Session]) -> None:
    """A redelivered message after the lease ran out claims the job without waiting for the reaper."""
    job_id = committed_job(committed_db)
    assert claim(job_id, "w1") is not None
    assert claim(job_id, "w2") is None
    with committed_db.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    again = claim(job_id, "w2")
    assert again is not None and again.attempt == 2


def test_a_pause_is_honoured_when_the_worker_dies_before_acting_on_it(
        committed_db: sessionmaker[Session]) -> None:
    """Regression: the API said 200 to the pause, the worker died, and the next attempt ran to success."""
    job_id = committed_job(committed_db, max_attempts=1)
    assert claim(job_id, "w1") is not None
    with committed_db.begin() as s:  # the pause is asked for, then the worker dies: its lease runs out
        s.execute(update(Job).where(Job.id == job_id).values(
            pause_requested=True, lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert claim(job_id, "w2") is None  # a redelivery must not run it past the pause
    assert reaper.reap_once()["expired"] == 1
    job = _job(committed_db, job_id)
    assert (job.status, job.pause_requested, job.lease_owner, job.attempt) == ("paused", False, None, 0)
    with committed_db() as s:
        messages = [e.message for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id))]
    assert any("paused as requested" in m for m in messages)


def test_reaper_resends_lost_queued_messages(committed_db: sessionmaker[Session],
                                             empty_training_queue: None) -> None:
    committed_job(committed_db, enqueued_at=utcnow() - timedelta(hours=1))
    assert reaper.reap_once()["resent"] == 1
    assert reaper.reap_once()["resent"] == 0  # its token is still waiting


def test_terminal_jobs_are_not_claimed(committed_db: sessionmaker[Session]) -> None:
    for status in ("succeeded", "failed", "cancelled", "paused"):
        assert claim(committed_job(committed_db, status=status), "w") is None


def test_prune_keeps_newest_and_best(committed_db: sessionmaker[Session], tmp_path: Path) -> None:
    from app.jobs.runner import prune_checkpoints
    from app.kit.storage import LocalStorage
    from app.orm import Checkpoint

    storage = LocalStorage(tmp_path)
    job_id = committed_job(committed_db)
    with committed_db.begin() as s:
        project_id = s.get(Job, job_id).project_id  # type: ignore[union-attr]
        for step in (1, 2, 3, 4, 5):
            key = f"jobs/{job_id}/checkpoints/step-{step}"
            storage.path(key).mkdir(parents=True)
            s.add(Checkpoint(id=f"ftckpt-{job_id}-{step}", job_id=job_id, project_id=project_id, step=step,
                             epoch=step, metrics={}, storage_key=key, fine_tuned_model_checkpoint=f"x:{step}",
                             is_best=step == 2))
    with committed_db.begin() as s:
        gone = prune_checkpoints(s, storage, job_id, keep=2)
    assert sorted(gone) == [f"ftckpt-{job_id}-1", f"ftckpt-{job_id}-3"]
    with committed_db() as s:
        left = sorted(c.step for c in s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)))
    assert left == [2, 4, 5]
    assert not storage.exists(f"jobs/{job_id}/checkpoints/step-1")
    assert storage.exists(f"jobs/{job_id}/checkpoints/step-2")
