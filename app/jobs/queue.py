"""The training queue. A `run_job` message is a claim token, not bound to a job: the worker that
receives one claims the next job in fair order (`claim_order`) with a conditional update, so the
order is decided by the database (creation time, fewest running per project), duplicates are
harmless (a surplus token finds nothing and is dropped) and a lost message is replaced by
`top_up`, which keeps the broker queue as long as the number of jobs that can be claimed now.
Enqueue after commit, pass ids."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, case, func, select
from sqlalchemy.orm import Session

from app.jobs.state import JobStatus
from app.kit.broker import RUN_JOB_TASK, TRAINING_QUEUE, get_celery
from app.kit.db import after_commit, session_scope
from app.orm import GangSeat, Job
from app.tenancy import service as tenancy

log = logging.getLogger(__name__)


def send_run_job(job_id: str | None = None) -> bool:
    """One claim token. `job_id` (the job that made it) is only for logs."""
    try:
        get_celery().send_task(RUN_JOB_TASK, args=[job_id] if job_id else [])
        return True
    except Exception:  # the reaper's top-up replaces a token that could not be sent
        log.exception("could not enqueue job; the reaper will retry", extra={"job_id": job_id})
        return False


def enqueue_job(session: Session, job_id: str) -> None:
    def send() -> None:
        send_run_job(job_id)
    after_commit(session, send)


def running_limit(project_id: str, session: Session) -> int | None:
    """How many of this project's jobs may run at once (its override, else the setting); None: no limit."""
    return tenancy.running_jobs_limit(session, project_id)


def _waiting(devices: int | None = None) -> list[ColumnElement[bool]]:
    """A queued job a worker may take (a job out of attempts is never claimed); with `devices`, only
    one that fits a worker of that many devices per node."""
    cond = [Job.status == JobStatus.queued, Job.attempt < Job.max_attempts]
    return cond if devices is None else [*cond, Job.devices <= devices]


@dataclass(frozen=True)
class Head:
    """The oldest waiting job of a project, and how many of that project's jobs run now."""

    job_id: str
    project_id: str
    running: int


def claim_order(session: Session, devices: int | None = None) -> list[Head]:
    """One head per project with waiting jobs, in the order a worker should try them: the project
    with the fewest running jobs first (no project starves another), then the oldest job. Creation
    time, not enqueue time: a revived or resumed job keeps its place. With `devices` (the worker's),
    jobs it cannot hold are left out before the heads are taken: a big job never blocks the smaller
    ones behind it on a small worker."""
    running = (select(Job.project_id, func.count().label("n")).where(Job.status == JobStatus.running)
               .group_by(Job.project_id).subquery())
    rank = func.row_number().over(partition_by=Job.project_id, order_by=(Job.created_at, Job.id))
    ranked = select(Job.id, Job.project_id, Job.created_at, rank.label("rank")).where(*_waiting(devices)).subquery()
    n_running = func.coalesce(running.c.n, 0)
    stmt = (select(ranked.c.id, ranked.c.project_id, n_running)
            .outerjoin(running, running.c.project_id == ranked.c.project_id)
            .where(ranked.c.rank == 1)
            .order_by(n_running, ranked.c.created_at, ranked.c.id))
    return [Head(job_id, project_id, int(n)) for job_id, project_id, n in session.execute(stmt)]


def claimable_count(session: Session) -> int:
    """Waiting jobs a worker could claim now (per project, no more than its free running slots), plus the
    seats of open gangs no follower took yet."""
    waiting = func.sum(case((and_(*_waiting()), 1), else_=0))
    running = func.sum(case((Job.status == JobStatus.running, 1), else_=0))
    stmt = (select(Job.project_id, waiting, running)
            .where(Job.status.in_([JobStatus.queued, JobStatus.running])).group_by(Job.project_id))
    total = 0
    for project_id, n_waiting, n_running in session.execute(stmt):
        limit = running_limit(project_id, session)
        free = int(n_waiting or 0) if limit is None else max(0, min(int(n_waiting or 0), limit - int(n_running)))
        total += free
    return total + vacant_seats(session)


def vacant_seats(session: Session) -> int:
    """Follower seats of gangs being formed that no worker took yet (`app.jobs.gang`)."""
    stmt = (select(func.count()).select_from(GangSeat).join(Job, and_(Job.id == GangSeat.job_id,
                                                                       Job.attempt == GangSeat.attempt))
            .where(GangSeat.worker_id.is_(None), Job.status == JobStatus.running))
    return int(session.scalar(stmt) or 0)


def broker_pending() -> int:
    """Messages waiting in the training queue (the Redis list, or the embedded broker's files);
    messages a worker holds are not counted: their jobs are no longer queued."""
    with get_celery().connection_for_read() as conn:
        return int(conn.default_channel.queue_declare(queue=TRAINING_QUEUE).message_count)


def top_up() -> int:
    """Send tokens until the broker holds one per claimable job; returns how many were sent. Never
    removes any: a surplus token is dropped by the worker that receives it."""
    with session_scope() as s:
        wanted = claimable_count(s)
    if wanted == 0:
        return 0
    missing = wanted - broker_pending()
    return sum(send_run_job() for _ in range(missing))


def purge_training_queue() -> int:
    """Drop every waiting claim token (operators, tests); the next top-up sends what is needed."""
    with get_celery().connection_for_write() as conn:
        return int(conn.default_channel.queue_purge(TRAINING_QUEUE) or 0)
