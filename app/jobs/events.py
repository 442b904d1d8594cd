"""Job events: the user-visible history of a job (`GET .../events`, SSE). Appending one never
imports anything above the ORM, so every layer that settles a job can record what happened.

Metric events carry the attempt that produced them (`data.attempt`); the event that starts an attempt
carries `data.resumed_from_step`. `metric_curve` turns them into the one curve a user sees (the result
CSV, `tunehouse jobs plot`): steps an attempt re-trains after a resume replace the abandoned ones."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.kit import ids
from app.orm import JobEvent

Level = Literal["info", "warn", "error"]
RESUMED_FROM = "resumed_from_step"  # in the data of the event that starts an attempt
NOT_VALUES = ("step", "attempt")


def add_event(session: Session, job_id: str, message: str, *, level: Level = "info", type: str = "message",
              data: dict[str, Any] | None = None) -> JobEvent:
    event = JobEvent(id=ids.event_id(), job_id=job_id, level=level, type=type, message=message, data=data)
    session.add(event)
    session.flush()
    return event


def metric_curve(events: Iterable[tuple[str, dict[str, Any] | None]]) -> list[dict[str, Any]]:
    """One row per step (`step` + every metric logged at it), from a job's `(type, data)` events oldest
    first. An attempt's start drops the steps past its resume point (trained by an attempt that was then
    abandoned); metrics of an attempt older than the newest started one (a worker that lost its lease
    but is still running) are ignored. A paused job resumes under the same attempt number."""
    rows: dict[int, dict[str, Any]] = {}
    newest = 0
    for kind, data in events:
        data = data or {}
        attempt = data.get("attempt")
        if kind != "metrics" and RESUMED_FROM in data:
            newest = max(newest, attempt) if isinstance(attempt, int) else newest
            start = data[RESUMED_FROM] if isinstance(data[RESUMED_FROM], int) else 0
            rows = {step: row for step, row in rows.items() if step <= start}
        elif kind == "metrics" and isinstance(data.get("step"), int):
            if isinstance(attempt, int) and attempt < newest:
                continue
            row = rows.setdefault(data["step"], {"step": data["step"]})
            row.update({k: v for k, v in data.items() if k not in NOT_VALUES})
    return [rows[step] for step in sorted(rows)]


def job_metric_curve(session: Session, job_id: str) -> list[dict[str, Any]]:
    """`metric_curve` of the job's events as stored."""
    stmt = select(JobEvent.type, JobEvent.data).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
    return metric_curve((kind, data) for kind, data in session.execute(stmt).tuples())
