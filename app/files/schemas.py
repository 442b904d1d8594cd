"""Files API wire shapes: the OpenAI file object plus additive fields (format, rows, stats)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from app.orm import File


class FileObject(BaseModel):
    id: str = Field(description="The file id (`file-...`), used as `training_file` / `validation_file`.")
    object: Literal["file"] = Field("file", description="Always `file`.")
    bytes: int = Field(description="Size of the stored file in bytes.")
    created_at: int = Field(description="Upload time (Unix seconds).")
    filename: str = Field(description="The name the file was uploaded with.")
    purpose: str = Field(description="`fine-tune` for uploads; `fine-tune-results` for files a job wrote.")
    status: str = Field(description="`processed` once stored and validated (uploads are validated before they answer).")
    status_details: str | None = Field(None, description="Why the file is not usable, if it is not.")
    expires_at: int | None = Field(None, description="Always null: files do not expire.")
    format: str | None = Field(
        None, description="Detected dataset format: chat, prompt_completion, text, classification, regression...")
    rows: int = Field(0, description="Number of examples (lines, or CSV rows) in the file.")
    stats: dict[str, Any] = Field(
        default_factory=dict,
        description="Extension: validation statistics (kind, labels, lengths; `cleaning` on cleaned copies).")

    @classmethod
    def of(cls, row: File) -> FileObject:
        return cls(
            id=row.id, bytes=row.bytes, created_at=int(row.created_at.timestamp()), filename=row.filename,
            purpose=row.purpose, status=row.status, status_details=row.status_details, format=row.format,
            rows=row.rows, stats=row.stats or {},
        )


class FileDeleted(BaseModel):
    id: str = Field(description="The deleted file's id.")
    object: Literal["file"] = Field("file", description="Always `file`.")
    deleted: bool = Field(True, description="Always true.")
