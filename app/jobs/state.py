"""The job state machine: the statuses, the sets that group them, the allowed edges, and
`transition`, the one conditional UPDATE every status change goes through (API, claim, heartbeat,
runner, reaper).

A transition names the statuses it may leave (and, for a worker, the lease it must hold), so a
write that lost a race matches no row instead of overwriting the winner. Callers check the result
and write nothing that depends on it (events, webhooks, models) when it is False."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, update
from sqlalchemy.orm import Session

from app.kit.db import utcnow
from app.orm import Job


class JobStatus(StrEnum):
    # Member names equal their values: Enum hashes by name, so plain strings read from the
    # database find members in the sets below.
    validating_files = "validating_files"
    queued = "queued"
    running = "running"
    paused = "paused"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class ExportStatus(StrEnum):
    """A weights export built by a worker (`app.jobs.exports`)."""

    queued = "queued"
    building = "building"
    ready = "ready"
    failed = "failed"


ACTIVE = frozenset({JobStatus.validating_files, JobStatus.queued, JobStatus.running, JobStatus.paused})
TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
# A worker may claim these (and a running job whose lease ran out: its worker died).
CLAIMABLE = frozenset({JobStatus.queued, JobStatus.validating_files})

# Target -> the statuses it may be entered from. running -> running is a re-claim after a lost lease.
SOURCES: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.validating_files: frozenset(),
    JobStatus.queued: frozenset({JobStatus.validating_files, JobStatus.running, JobStatus.paused}),
    JobStatus.running: CLAIMABLE | {JobStatus.running},
    JobStatus.paused: CLAIMABLE | {JobStatus.running},
    JobStatus.succeeded: frozenset({JobStatus.running}),
    JobStatus.failed: frozenset({JobStatus.running}),
    JobStatus.cancelled: ACTIVE,
}


def _implied(to: JobStatus, values: dict[str, Any]) -> dict[str, Any]:
    """Invariants of every edge: only a running job holds a lease; a finished job has finished_at."""
    out = {**values, "status": to}
    if to is not JobStatus.running:
        out.setdefault("lease_owner", None)
        out.setdefault("lease_expires_at", None)
    if to in TERMINAL:
        out.setdefault("finished_at", utcnow())
    return out


def transition(session: Session, job_id: str, *, to: JobStatus | None, from_: Collection[JobStatus],
               owner: str | None = None, where: Iterable[ColumnElement[bool]] = (), **values: Any) -> bool:
    """`UPDATE jobs SET status=:to, **values WHERE id=:job_id AND status IN (:from_)
    [AND lease_owner=:owner] [AND where...]`; True when it hit the row. `to=None` keeps the status
    (lease renewal, flags). Objects of this job in `session` are refreshed."""
    if not from_:
        raise ValueError("a transition needs the statuses it may leave")
    if to is not None and not set(from_) <= SOURCES[to]:
        raise ValueError(f"no edge to {to} from {sorted(set(from_) - SOURCES[to])}")
    if to is not None:
        values = _implied(to, values)
    if not values:
        raise ValueError("a transition must set something")
    cond = [Job.id == job_id, Job.status.in_(sorted(from_)), *where]
    if owner is not None:
        cond.append(Job.lease_owner == owner)
    stmt = update(Job).where(*cond).values(**values).execution_options(synchronize_session="fetch")
    return bool(cast(CursorResult[Any], session.execute(stmt)).rowcount)
