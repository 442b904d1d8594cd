"""Files: validate and store uploads, look up, list, delete. Every query is scoped to a project.
Services flush; the request dependency commits."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import IO, Any, Literal

from sqlalchemy import Select, or_, select
from sqlalchemy.orm import Session

from app.files.status import FileStatus
from app.files.upload import Upload
from app.jobs.state import TERMINAL
from app.kit import ids
from app.kit.db import after_commit, utcnow
from app.kit.errors import Conflict, InvalidRequest, NotFound
from app.kit.pagination import paginate
from app.kit.storage import Storage
from app.orm import File, Job
from app.settings import get_settings
from app.tenancy.service import check_storage_quota
from ml.data.formats import Report, kind_from_name, sniff_kind, validate_file

log = logging.getLogger(__name__)

UPLOAD_PURPOSES = {"fine-tune"}  # what users may upload; jobs write "fine-tune-results" themselves
MAX_LIST_LIMIT = 10_000


class InvalidFileFormat(InvalidRequest):
    """400 naming the first bad line; every reported line error rides along in `details`."""

    code = "invalid_file_format"

    def __init__(self, report: Report) -> None:
        errors = report.errors
        more = len(errors) - 1
        suffix = ""
        if report.truncated:
            suffix = f" (and more: showing the first {len(errors)} errors in 'details')"
        elif more:
            suffix = f" (and {more} more error{'s' if more > 1 else ''} in 'details')"
        super().__init__(f"Invalid file format: {errors[0].render()}{suffix}", param="file")
        self.details = [{"line": e.line, "field": e.field, "message": e.message} for e in errors]

    def body(self) -> dict[str, Any]:
        out = super().body()
        out["error"]["details"] = self.details
        return out


def check_purpose(purpose: str | None) -> str:
    if not purpose:
        raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose",
                             code="missing_required_parameter")
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(f"Invalid purpose {purpose!r}: uploads accept 'fine-tune' only.",
                             param="purpose", code="invalid_value")
    return purpose


def check_form_field(name: str, value: str) -> None:
    """Called as each small form field arrives, so a bad purpose fails before the file streams."""
    if name == "purpose":
        check_purpose(value)


def validate_upload(upload: Upload) -> Report:
    settings = get_settings()
    kind = sniff_kind(upload.filename, upload.head)
    report = validate_file(
        upload.path, kind, max_line_bytes=settings.max_line_bytes,
        max_errors=settings.max_errors_reported, sniffed=kind_from_name(upload.filename) is None,
    )
    if report.errors:
        raise InvalidFileFormat(report)
    return report


def create_file(session: Session, project_id: str, upload: Upload, storage: Storage) -> File:
    """Validate the staged upload, move it into place and record it (status processed)."""
    purpose = check_purpose(upload.fields.get("purpose"))
    report = validate_upload(upload)
    check_storage_quota(session, project_id, upload.size)
    return store_file(session, storage, upload.path, project_id=project_id, purpose=purpose,
                      filename=upload.filename or "upload", report=report, sha256=upload.sha256)


def store_file(session: Session, storage: Storage, staged: Path, *, project_id: str, purpose: str,
               filename: str, report: Report, sha256: str, stats: dict[str, Any] | None = None) -> File:
    """Move a validated staged file into place (atomically) and record it; if the row can't be
    written, the bytes go too. Services flush; the caller's boundary commits."""
    file_id = ids.file_id()
    key = f"files/{project_id}/{file_id}.{'csv' if report.kind == 'csv' else 'jsonl'}"
    size = staged.stat().st_size
    storage.put_file(key, staged)
    row = File(
        id=file_id, project_id=project_id, purpose=purpose, filename=filename, bytes=size,
        status=FileStatus.processed, format=report.format.value if report.format else None, rows=report.rows,
        sha256=sha256, storage_key=key, stats=stats if stats is not None else report.stats(),
    )
    session.add(row)
    try:
        session.flush()
    except BaseException:
        storage.delete(key)
        raise
    return row


def _live(project_id: str) -> Select[File]:
    return select(File).where(File.project_id == project_id, File.deleted_at.is_(None))


def get_file(session: Session, project_id: str, file_id: str, param: str = "file_id", *,
             lock: Literal["share", "update"] | None = None) -> File:
    """The project's live file, or 404 naming `param`. `lock="share"` (FOR SHARE) keeps it from
    being deleted until the caller's transaction ends: use it when a job starts to reference it."""
    stmt = _live(project_id).where(File.id == file_id)
    if lock is not None:
        stmt = stmt.with_for_update(read=lock == "share")
    row = session.scalar(stmt)
    if row is None:
        raise NotFound(f"No such File object: {file_id}", param=param, code="file_not_found")
    return row


def list_files(session: Session, project_id: str, *, purpose: str | None = None, after: str | None = None,
               limit: int = 100, order: Literal["asc", "desc"] = "desc") -> tuple[list[File], bool]:
    stmt = _live(project_id)
    if purpose:
        stmt = stmt.where(File.purpose == purpose)
    return paginate(session, stmt, File, after, limit, File.created_at, max_limit=MAX_LIST_LIMIT,
                    descending=order == "desc")


def _delete_bytes(storage: Storage, key: str) -> None:
    try:
        storage.delete(key)
    except Exception:
        log.exception("could not delete stored file bytes %s", key)


def delete_file(session: Session, project_id: str, file_id: str, storage: Storage) -> File:
    """Soft-delete the row; the bytes go once that commits. 409 while an unfinished job uses it."""
    row = get_file(session, project_id, file_id, lock="update")
    busy = session.scalar(
        select(Job.id).where(or_(Job.training_file == row.id, Job.validation_file == row.id),
                             Job.status.not_in(sorted(TERMINAL))).limit(1)
    )
    if busy is not None:
        raise Conflict(f"File {file_id} is used by fine-tuning job {busy}, which has not finished.",
                       param="file_id", code="file_in_use")
    row.status, row.deleted_at = FileStatus.deleted, utcnow()
    session.flush()
    key = row.storage_key
    after_commit(session, lambda: _delete_bytes(storage, key))
    return row


def open_content(session: Session, project_id: str, file_id: str, storage: Storage) -> tuple[File, IO[bytes]]:
    row = get_file(session, project_id, file_id)
    try:
        return row, storage.open_read(row.storage_key)
    except FileNotFoundError:
        raise NotFound(f"The content of {file_id} is no longer stored.", param="file_id",
                       code="file_not_found") from None
