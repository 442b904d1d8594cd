"""Rows for tests that don't need a real upload."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.kit import ids
from app.orm import File, Project


def make_file(db: Session, project: Project, fmt: str = "chat", rows: int = 50, **stats: Any) -> File:
    f = File(id=ids.file_id(), project_id=project.id, purpose="fine-tune", filename=f"{fmt}.jsonl",
             bytes=1000, status="processed", format=fmt, rows=rows, storage_key=f"files/{project.id}/x.jsonl",
             stats={"kind": "jsonl", "rows": rows, **stats})
    db.add(f)
    db.flush()
    return f
