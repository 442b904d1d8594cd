"""The training queue's order: claim tokens take the next job by creation time (a revived job
keeps its place), the project with the fewest running jobs first, under its running limit."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.jobs import reaper
from app.jobs.lease import claim_next
from app.jobs.queue import claimable_count
from app.jobs.runner import run_next
from app.kit.db import utcnow
from app.orm import Job, Project
from app.settings import get_settings
from tests.conftest import USING_PG
from tests.jobs.worker_factories import committed_job

T0 = utcnow() - timedelta(hours=1)


@pytest.fixture
def limit_one() -> Iterator[None]:
    s = get_settings()
    saved = s.max_running_jobs_per_project
    s.max_running_jobs_per_project = 1
    yield
    s.max_running_jobs_per_project = saved


def _at(seconds: float) -> dict[str, Any]:
    return {"created_at": T0 + timedelta(seconds=seconds), "enqueued_at": T0 + timedelta(seconds=seconds)}


def _claimed(worker: str) -> str | None:
    got = claim_next(worker)
    return got.job_id if got else None


def _set(factory: sessionmaker[Session], job_id: str, **values: object) -> None:
    with factory.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))


def test_a_revived_job_keeps_its_place(committed_db: sessionmaker[Session], empty_training_queue: None) -> None:
    """Regression (defect 9): a job re-queued after its worker died waited behind 5 newer jobs."""
    first = committed_job(committed_db, **_at(0))
    assert _claimed("w1") == first
    newer = [committed_job(committed_db, **_at(i + 1)) for i in range(5)]
    _set(committed_db, first, lease_expires_at=utcnow() - timedelta(seconds=1))  # its worker died
    assert reaper.reap_once()["expired"] == 1
    got = claim_next("w2")
    assert got is not None and (got.job_id, got.attempt) == (first, 2)
    assert [_claimed(f"w{i}") for i in range(5)] == newer  # then oldest first


def test_order_is_creation_not_enqueue_time(committed_db: sessionmaker[Session]) -> None:
    """A job resumed from a pause (re-enqueued now) still goes before jobs created after it."""
    older = committed_job(committed_db, created_at=T0, enqueued_at=utcnow())
    newer = committed_job(committed_db, created_at=T0 + timedelta(seconds=1), enqueued_at=T0)
    assert [_claimed("a"), _claimed("b"), _claimed("c")] == [older, newer, None]


def test_a_busy_project_does_not_starve_another(committed_db: sessionmaker[Session]) -> None:
    big = [committed_job(committed_db, project_name="big", **_at(i)) for i in range(50)]
    assert _claimed("w1") == big[0]
    lone = committed_job(committed_db, project_name="small", **_at(100))
    assert _claimed("w2") == lone  # "small" runs nothing yet: it goes before big's 49 older jobs
    assert _claimed("w3") == big[1]


def test_running_limit_holds_jobs_back(committed_db: sessionmaker[Session], limit_one: None) -> None:
    a1, a2 = (committed_job(committed_db, project_name="a", **_at(i)) for i in (0, 1))
    b1 = committed_job(committed_db, project_name="b", **_at(2))
    with committed_db() as s:
        assert claimable_count(s) == 2  # a1 and b1: one slot each
    assert [_claimed("w1"), _claimed("w2"), _claimed("w3")] == [a1, b1, None]
    with committed_db() as s:
        assert claimable_count(s) == 0  # a2 waits for a slot
    _set(committed_db, a1, status="succeeded", lease_owner=None)
    with committed_db() as s:
        assert claimable_count(s) == 1
    assert _claimed("w4") == a2


@pytest.mark.skipif(not USING_PG, reason="the limit's row lock is Postgres'; embedded mode has one worker")
def test_concurrent_claims_respect_the_limit(committed_db: sessionmaker[Session], limit_one: None) -> None:
    jobs = [committed_job(committed_db, project_name="a", **_at(i)) for i in range(4)]
    results: list[str | None] = []
    threads = [threading.Thread(target=lambda i=i: results.append(_claimed(f"w{i}"))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results, key=str) == sorted([jobs[0], None, None, None], key=str)


def test_a_surplus_token_is_dropped(committed_db: sessionmaker[Session]) -> None:
    committed_job(committed_db, status="succeeded")
    committed_job(committed_db, status="paused")
    assert run_next("w") == "skipped"


def test_a_project_override_replaces_the_running_limit(committed_db: sessionmaker[Session]) -> None:
    """`tunehouse projects limits set --max-running-jobs 1` holds that project's second job back."""
    a1, a2 = (committed_job(committed_db, project_name="capped", **_at(i)) for i in (0, 1))
    with committed_db.begin() as s:
        project_id = s.get_one(Job, a1).project_id
        s.execute(update(Project).where(Project.id == project_id).values(max_running_jobs=1))
    assert [_claimed("w1"), _claimed("w2")] == [a1, None]
    _set(committed_db, a1, status="succeeded", lease_owner=None)
    assert _claimed("w3") == a2
