"""Rows for tests that don't need a real upload."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.auth.service import create_api_key, get_or_create_project
from app.jobs.events import add_event
from app.kit import ids
from app.orm import File, Job, Project


def make_file(db: Session, project: Project, fmt: str = "chat", rows: int = 50, **stats: Any) -> File:
    f = File(id=ids.file_id(), project_id=project.id, purpose="fine-tune", filename=f"{fmt}.jsonl",
             bytes=1000, status="processed", format=fmt, rows=rows, storage_key=f"files/{project.id}/x.jsonl",
             stats={"kind": "jsonl", "rows": rows, **stats})
    db.add(f)
    db.flush()
    return f


def add_job(s: Session, project: Project, status: str = "queued", events: int = 0) -> Job:
    """A job (on a placeholder file) with `events` events, flushed: rows only, nothing trains."""
    file = File(id=ids.file_id(), project_id=project.id, purpose="fine-tune", filename="t.jsonl",
                storage_key="files/none")
    s.add(file)
    s.flush()
    job = Job(id=ids.job_id(), project_id=project.id, model="minilm-l6", training_file=file.id, seed=0,
              task="classification", training_type={"type": "lora"}, hyperparameters={},
              config={"base_model": "minilm-l6"}, status=status, suffix="t")
    s.add(job)
    s.flush()
    for i in range(events):
        add_event(s, job.id, f"event {i}")
    return job


def seed_key_and_job(factory: sessionmaker[Session], name: str, status: str = "queued", events: int = 0
                     ) -> tuple[str, Project, Job]:
    """Committed: a project, its API key and one job with `events` events (rows only: nothing trains)."""
    with factory() as s:
        project = get_or_create_project(s, name)
        key = create_api_key(s, project, "t")
        job = add_job(s, project, status, events)
        s.commit()
    return key, project, job
