"""Committed rows for worker tests (they cross threads and processes)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.auth.service import create_api_key, get_or_create_project
from app.kit import ids
from app.orm import File, Job


def committed_job(factory: sessionmaker[Session], status: str = "queued", project_name: str = "worker-tests",
                  **kw: Any) -> str:
    with factory() as s:
        project = get_or_create_project(s, project_name)
        create_api_key(s, project)
        f = File(id=ids.file_id(), project_id=project.id, purpose="fine-tune", filename="x.jsonl", bytes=1,
                 format="text", rows=1, storage_key="files/x.jsonl", stats={})
        s.add(f)
        s.flush()
        job = Job(id=ids.job_id(), project_id=project.id, model="tiny-lm", training_file=f.id, seed=1,
                  task="causal_lm", training_type={"type": "lora"}, hyperparameters={}, config={},
                  status=status, max_attempts=kw.pop("max_attempts", 3), **kw)
        s.add(job)
        s.commit()
        return job.id
