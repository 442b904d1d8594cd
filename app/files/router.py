"""OpenAI-compatible Files API: /v1/files (upload, list), /v1/files/{id} (retrieve, delete),
/v1/files/{id}/content (download), and the /v1/files/{id}/clean extension."""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Literal
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from app.auth.deps import CurrentProject, DetachedProject
from app.files import cleaning, service
from app.files.schemas import FileDeleted, FileObject
from app.files.upload import receive_upload
from app.kit.deps import DB, run_db
from app.kit.pagination import ListPage
from app.kit.storage import get_storage, staged_file
from app.tenancy.service import file_size_limit

router = APIRouter(tags=["files"])

CHUNK = 1 << 20
MEDIA_TYPES = {"jsonl": "application/jsonl", "csv": "text/csv"}


# The body is streamed by hand (receive_upload), so FastAPI cannot infer it: documented here for
# Swagger's upload form and generated clients.
UPLOAD_BODY = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {
        "file": {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream",
                 "description": "The dataset: JSONL (one object per line) or CSV with a header."},
        "purpose": {"type": "string", "enum": sorted(service.UPLOAD_PURPOSES),
                    "description": "What the file is for; uploads accept `fine-tune` only."},
    },
}}}}


@router.post("/files", openapi_extra={"requestBody": UPLOAD_BODY})
async def create_file(request: Request, project: DetachedProject) -> FileObject:
    """Upload (multipart: `file`, `purpose=fine-tune`), streamed to disk and validated line by line."""
    # No session is held while a possibly slow body streams in: the row is written in one of its own.
    project_id, max_bytes = project.id, file_size_limit(project)
    storage = get_storage()
    with staged_file(storage, suffix=".upload") as tmp:
        upload = await receive_upload(request, tmp, max_bytes, service.check_form_field)
        row = await run_db(request, service.create_file, project_id, upload, storage)
    return FileObject.of(row)


@router.get("/files")
def list_files(
    db: DB, project: CurrentProject, purpose: str | None = None, after: str | None = None,
    limit: int = Query(100, description=f"1..{service.MAX_LIST_LIMIT}"),
    order: Literal["asc", "desc"] = "desc",
) -> ListPage[FileObject]:
    rows, has_more = service.list_files(db, project.id, purpose=purpose, after=after, limit=limit,
                                        order=order)
    data = [FileObject.of(r) for r in rows]
    return ListPage[FileObject](data=data, has_more=has_more, first_id=data[0].id if data else None,
                                last_id=data[-1].id if data else None)


@router.get("/files/{file_id}")
def retrieve_file(file_id: str, db: DB, project: CurrentProject) -> FileObject:
    return FileObject.of(service.get_file(db, project.id, file_id))


@router.post("/files/{file_id}/clean")
def clean_file(file_id: str, db: DB, project: CurrentProject,
               body: cleaning.CleaningOptions | None = None) -> FileObject:
    """Extension: a NEW cleaned, validated copy of a fine-tune file (dedupe, near-dedupe, empty / too
    long rows, PII scrubbing); the report is in its `stats.cleaning`."""
    options = body or cleaning.CleaningOptions.model_validate({})
    return FileObject.of(cleaning.clean_file(db, project.id, file_id, options, get_storage()))


@router.delete("/files/{file_id}")
def delete_file(file_id: str, db: DB, project: CurrentProject) -> FileDeleted:
    row = service.delete_file(db, project.id, file_id, get_storage())
    return FileDeleted(id=row.id)


def _chunks(fh: IO[bytes]) -> Iterator[bytes]:
    with fh:
        while chunk := fh.read(CHUNK):
            yield chunk


@router.get("/files/{file_id}/content")
def file_content(file_id: str, db: DB, project: CurrentProject) -> StreamingResponse:
    row, fh = service.open_content(db, project.id, file_id, get_storage())
    kind = (row.stats or {}).get("kind", "")
    headers = {"Content-Disposition": f"attachment; filename*=UTF-8''{quote(row.filename)}"}
    return StreamingResponse(_chunks(fh), media_type=MEDIA_TYPES.get(kind, "application/octet-stream"),
                             headers=headers)
