"""Per-project limits (settings defaults, per-project overrides on `projects`), the quota checks job
creation and uploads make, and metered usage (`project_usage`, bumped with one atomic upsert).
Services flush; the caller's boundary commits."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import anyio.to_thread
from sqlalchemy import func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from app.jobs.state import JobStatus
from app.kit.db import session_scope, utcnow
from app.kit.errors import NotFound, TunehouseError
from app.kit.hotcache import bump_after_commit
from app.orm import File, Job, Project, ProjectUsage
from app.settings import get_settings
from app.tenancy.meter import UsageMeter
from app.tenancy.ratelimit import rpm_limit
from app.tenancy.schemas import LIMIT_FIELDS, LimitsOut, UsageOut

log = logging.getLogger(__name__)

COUNTERS = ("trained_tokens", "device_seconds", "predictions", "tokens_served")
WAITING = (JobStatus.validating_files, JobStatus.queued)  # what the queued-jobs quota counts
DEVICES_PER_WORKER = 1  # a training worker process trains on one device (one GPU, or the CPU)


class QuotaExceeded(TunehouseError):
    """OpenAI answers an exhausted quota with 429 `insufficient_quota`; `x-should-retry: false` tells
    its clients not to retry what only freeing room (or the operator) fixes."""

    status_code = 429
    type = "insufficient_quota"
    code = "quota_exceeded"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.headers = {"x-should-retry": "false"}


# --- limits ---------------------------------------------------------------------------------

def get_project(session: Session, ref: str) -> Project:
    """A project by id or name (operator tools), or 404."""
    project = session.scalar(select(Project).where(or_(Project.id == ref, Project.name == ref)))
    if project is None:
        raise NotFound(f"No project with id or name '{ref}'.", param="project", code="project_not_found")
    return project


def limits(project: Project) -> LimitsOut:
    """The limits in force (0: unlimited) and the overrides set on the project."""
    s = get_settings()
    return LimitsOut(
        rpm=rpm_limit(project),
        max_queued_jobs=_pick(project.max_queued_jobs, s.max_queued_jobs),
        max_running_jobs=_pick(project.max_running_jobs, s.max_running_jobs_per_project),
        max_storage_bytes=_pick(project.max_storage_bytes, s.max_storage_bytes),
        max_file_bytes=file_size_limit(project),
        overrides={f: v for f in LIMIT_FIELDS if (v := getattr(project, _column(f))) is not None},
    )


def _pick(override: int | None, default: int) -> int:
    return default if override is None else override


def _column(field: str) -> str:
    return "rpm_limit" if field == "rpm" else field


def file_size_limit(project: Project) -> int:
    """Largest upload for the project: its override, else TUNEHOUSE_MAX_UPLOAD_BYTES (0: that cap)."""
    return project.max_file_bytes or get_settings().max_upload_bytes


def running_jobs_limit(session: Session, project_id: str) -> int | None:
    """For the job claim: how many of the project's jobs may run at once; None: no limit."""
    override = session.scalar(select(Project.max_running_jobs).where(Project.id == project_id))
    return _pick(override, get_settings().max_running_jobs_per_project) or None


def set_limits(session: Session, ref: str, changes: dict[str, int | None]) -> Project:
    """Operator: set (an int, 0 = unlimited) or clear (None: back to the default) the given limits."""
    project = get_project(session, ref)
    for field, value in changes.items():
        if field not in LIMIT_FIELDS:
            raise ValueError(f"unknown limit {field!r}")
        if value is not None and value < 0:
            raise ValueError(f"{field} must be >= 0 (0: unlimited)")
        setattr(project, _column(field), value)
    session.flush()
    bump_after_commit(session)  # projects are cached with their limits (app.auth.deps)
    return project


# --- quotas ---------------------------------------------------------------------------------

def _lock(session: Session, project_id: str) -> None:
    """Serializes the project's quota checks until commit, so two requests can't both take the last slot
    (FOR NO KEY UPDATE: inserts that merely reference the project are not blocked)."""
    session.execute(select(Project.id).where(Project.id == project_id).with_for_update(key_share=True))


def check_job_quota(session: Session, project: Project) -> None:
    """At job creation: 429 `quota_exceeded` when the project already has its maximum of waiting jobs."""
    limit = _pick(project.max_queued_jobs, get_settings().max_queued_jobs)
    if limit <= 0:
        return
    _lock(session, project.id)
    waiting = queued_jobs(session, project.id)
    if waiting >= limit:
        raise QuotaExceeded(f"Quota exceeded: this project already has {waiting} queued fine-tuning jobs "
                            f"and may have at most {limit}. Wait for some to start, or cancel one.")


def check_storage_quota(session: Session, project_id: str, incoming: int) -> None:
    """Before storing `incoming` more bytes: 429 `quota_exceeded` past the project's storage quota."""
    project = session.get(Project, project_id)
    limit = _pick(project.max_storage_bytes if project else None, get_settings().max_storage_bytes)
    if limit <= 0:
        return
    _lock(session, project_id)
    used = stored_bytes(session, project_id)
    if used + incoming > limit:
        raise QuotaExceeded(f"Quota exceeded: this project stores {used} bytes of its {limit}-byte storage "
                            f"quota and this file has {incoming}. Delete files you no longer need.",
                            param="file")


def queued_jobs(session: Session, project_id: str) -> int:
    return _count_jobs(session, project_id, WAITING)


def _count_jobs(session: Session, project_id: str, statuses: tuple[JobStatus, ...]) -> int:
    stmt = select(func.count()).select_from(Job).where(Job.project_id == project_id, Job.status.in_(statuses))
    return int(session.scalar(stmt) or 0)


def stored_bytes(session: Session, project_id: str) -> int:
    """Bytes of the project's live files (uploads, cleaned copies, result files)."""
    stmt = select(func.coalesce(func.sum(File.bytes), 0)).where(File.project_id == project_id,
                                                                File.deleted_at.is_(None))
    return int(session.scalar(stmt) or 0)


# --- usage ----------------------------------------------------------------------------------

def add_usage(session: Session, project_id: str, **deltas: float) -> None:
    """Add to the project's counters: one INSERT ... ON CONFLICT DO UPDATE, atomic under concurrency."""
    if unknown := set(deltas) - set(COUNTERS):
        raise ValueError(f"unknown usage counters: {sorted(unknown)}")
    deltas = {k: v for k, v in deltas.items() if v}
    if not deltas:
        return
    now = utcnow()
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    stmt = insert(ProjectUsage).values(project_id=project_id, updated_at=now,
                                       **{c: deltas.get(c, 0) for c in COUNTERS})
    bump: dict[str, Any] = {c: getattr(ProjectUsage, c) + v for c, v in deltas.items()}
    session.execute(stmt.on_conflict_do_update(index_elements=[ProjectUsage.project_id],
                                               set_={**bump, "updated_at": now}))


def record_served(session: Session, project_id: str, predictions: int, tokens: int) -> None:
    add_usage(session, project_id, predictions=predictions, tokens_served=tokens)


METER = UsageMeter(record_served)  # served counts: in memory, written in batches (app.tenancy.meter)


async def flush_metered_usage() -> None:
    """At shutdown: write what is pending (off the event loop); a database that is down loses it."""
    try:
        await anyio.to_thread.run_sync(METER.flush)
    except Exception:
        log.warning("could not write metered usage at shutdown", exc_info=True)


class _Usage(Protocol):
    @property
    def total_tokens(self) -> int: ...


class _Served(Protocol):
    @property
    def usage(self) -> _Usage: ...


S = TypeVar("S", bound=_Served)


def served(project_id: str, result: S, factory: sessionmaker[Session] | None = None) -> S:
    """Meter an inference response (its choices or data items, and `usage.total_tokens`); returns it."""
    outputs = len(getattr(result, "choices", None) or getattr(result, "data", None) or [])
    METER.add(project_id, outputs, result.usage.total_tokens, factory)
    return result


def served_stream(project_id: str, outputs: int, factory: sessionmaker[Session] | None = None) -> None:
    """A streamed response is metered when it starts: its outputs, not its tokens (not known yet)."""
    METER.add(project_id, outputs, 0, factory)


@contextmanager
def metered_attempt(job_id: str) -> Iterator[None]:
    """Around one training attempt: its wall time x devices goes to the project's device-seconds when
    it ends, however it ends (a worker killed outright records nothing)."""
    started = time.monotonic()
    try:
        yield
    finally:
        try:
            record_attempt(job_id, time.monotonic() - started)
        except Exception:
            log.exception("could not record the attempt's usage", extra={"job_id": job_id})


def record_attempt(job_id: str, seconds: float) -> None:
    with session_scope() as s:
        project_id = s.scalar(select(Job.project_id).where(Job.id == job_id))
        if project_id is not None:
            add_usage(s, project_id, device_seconds=seconds * DEVICES_PER_WORKER)


def usage(session: Session, project: Project) -> UsageOut:
    METER.flush_into(session)  # this process's served counts not written yet
    row = session.get(ProjectUsage, project.id)
    return UsageOut(
        project_id=project.id, project=project.name,
        trained_tokens=row.trained_tokens if row else 0,
        device_seconds=round(row.device_seconds, 3) if row else 0.0,
        predictions=row.predictions if row else 0, tokens_served=row.tokens_served if row else 0,
        stored_bytes=stored_bytes(session, project.id), queued_jobs=queued_jobs(session, project.id),
        running_jobs=_count_jobs(session, project.id, (JobStatus.running,)),
        limits=limits(project),
    )


def all_usage(session: Session) -> list[UsageOut]:
    METER.flush_into(session)
    return [usage(session, p) for p in session.scalars(select(Project).order_by(Project.name))]
