"""The reaper keeps one claim token per claimable job in the real broker queue: it replaces lost
ones and never floods the queue, however many passes run while nobody consumes."""

from __future__ import annotations

from datetime import timedelta

import redis
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.jobs import reaper
from app.jobs.lease import claim_next
from app.jobs.queue import broker_pending, claimable_count, enqueue_job
from app.kit.broker import TRAINING_QUEUE
from app.kit.db import utcnow
from app.orm import Job
from tests.conftest import REDIS_URL, USING_REDIS
from tests.jobs.worker_factories import committed_job


def _pending() -> int:
    """The broker's own count: the Redis list's length when on Redis."""
    if USING_REDIS:
        return int(redis.Redis.from_url(REDIS_URL).llen(TRAINING_QUEUE))
    return broker_pending()


def _queued(factory: sessionmaker[Session]) -> int:
    with factory() as s:
        return claimable_count(s)


def test_queue_length_tracks_queued_jobs_over_many_passes(committed_db: sessionmaker[Session],
                                                          empty_training_queue: None) -> None:
    """Regression (defect 4): 3 waiting jobs became 9 messages in 70 s, growing every pass."""
    for _ in range(3):  # their messages were lost (a Redis restart)
        committed_job(committed_db, enqueued_at=utcnow() - timedelta(hours=1))
    lengths = []
    for _ in range(6):
        reaper.reap_once()
        lengths.append(_pending())
    assert lengths == [3] * 6

    with committed_db() as s:  # a job enqueued the normal way, after its commit
        job = s.get(Job, committed_job(committed_db))
        assert job is not None
        enqueue_job(s, job.id)
        s.commit()
    for _ in range(3):
        reaper.reap_once()
        assert _pending() == _queued(committed_db) == 4


def test_a_requeued_job_gets_one_token(committed_db: sessionmaker[Session], empty_training_queue: None) -> None:
    committed_job(committed_db)
    reaper.reap_once()
    got = claim_next("w1")  # claimed without consuming its token: the token is now a surplus one
    assert got is not None and _pending() == 1 and _queued(committed_db) == 0
    with committed_db.begin() as s:  # its worker dies
        s.execute(update(Job).where(Job.id == got.job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert reaper.reap_once() == {"expired": 1, "resent": 0}  # the waiting token serves it
    assert _pending() == _queued(committed_db) == 1
    assert reaper.reap_once()["resent"] == 0 and _pending() == 1
