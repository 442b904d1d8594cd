"""Files API wire shapes: the OpenAI file object plus additive fields (format, rows, stats)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from app.orm import File


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None = None
    expires_at: int | None = None
    format: str | None = None
    rows: int = 0
    stats: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, row: File) -> FileObject:
        return cls(
            id=row.id, bytes=row.bytes, created_at=int(row.created_at.timestamp()), filename=row.filename,
            purpose=row.purpose, status=row.status, status_details=row.status_details, format=row.format,
            rows=row.rows, stats=row.stats or {},
        )


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
