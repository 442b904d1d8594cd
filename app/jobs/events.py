"""Job events: the user-visible history of a job (`GET .../events`, SSE). Appending one never
imports anything above the ORM, so every layer that settles a job can record what happened."""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy.orm import Session

from app.kit import ids
from app.orm import JobEvent

Level = Literal["info", "warn", "error"]


def add_event(session: Session, job_id: str, message: str, *, level: Level = "info", type: str = "message",
              data: dict[str, Any] | None = None) -> JobEvent:
    event = JobEvent(id=ids.event_id(), job_id=job_id, level=level, type=type, message=message, data=data)
    session.add(event)
    session.flush()
    return event
