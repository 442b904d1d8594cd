from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from app.auth.deps import CurrentProject
from app.jobs import download, exports, service
from app.jobs.estimate import EstimateOut
from app.jobs.schemas import CheckpointOut, EventOut, ExportOut, JobCreate, JobOut
from app.jobs.stream import follow
from app.kit.deps import DB
from app.kit.errors import InvalidRequest
from app.kit.pagination import ListPage, page
from app.kit.storage import get_storage

# Prefix "/fine_tuning" (not ".../jobs"): POST /fine_tuning/estimate lives here too.
router = APIRouter(prefix="/fine_tuning", tags=["fine-tuning"])


@router.post("/jobs", response_model=JobOut)
def create_job(body: JobCreate, db: DB, project: CurrentProject,
               idempotency_key: Annotated[str | None, Header(max_length=256)] = None) -> JobOut:
    return service.to_out(db, service.create_job(db, project, body, idempotency_key))


def _metadata_filter(request: Request) -> dict[str, str]:
    """`metadata[key]=value` query parameters, as the OpenAI API takes them."""
    out = {}
    for key, value in request.query_params.multi_items():
        if key.startswith("metadata[") and key.endswith("]"):
            out[key[9:-1]] = value
    return out


@router.post("/estimate", response_model=EstimateOut)
def estimate_job(body: JobCreate, db: DB, project: CurrentProject) -> EstimateOut:
    """Extension: tokens, steps and duration of a job body (validated exactly like job creation)."""
    return service.estimate_job(db, project, body)


@router.get("/jobs", response_model=ListPage[JobOut])
def list_jobs(request: Request, db: DB, project: CurrentProject, after: str | None = None,
              limit: int = 20) -> ListPage[JobOut]:
    rows, has_more = service.list_jobs(db, project, after, limit, _metadata_filter(request))
    positions = service.queue_positions(db, rows)
    return page([service.to_out(db, j, positions) for j in rows], has_more)


@router.get("/jobs/{job_id}", response_model=JobOut)
def retrieve_job(job_id: str, db: DB, project: CurrentProject) -> JobOut:
    return service.to_out(db, service.get_job(db, project, job_id))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, db: DB, project: CurrentProject) -> JobOut:
    return service.to_out(db, service.cancel_job(db, project, job_id))


@router.post("/jobs/{job_id}/pause", response_model=JobOut)
def pause_job(job_id: str, db: DB, project: CurrentProject) -> JobOut:
    return service.to_out(db, service.pause_job(db, project, job_id))


@router.post("/jobs/{job_id}/resume", response_model=JobOut)
def resume_job(job_id: str, db: DB, project: CurrentProject) -> JobOut:
    return service.to_out(db, service.resume_job(db, project, job_id))


@router.get("/jobs/{job_id}/events", response_model=ListPage[EventOut])
def list_events(request: Request, job_id: str, db: DB, project: CurrentProject, after: str | None = None,
                limit: int = 20, stream: bool = False,
                last_event_id: Annotated[str | None, Header()] = None) -> Any:
    if stream or "text/event-stream" in request.headers.get("accept", ""):
        service.get_job(db, project, job_id)
        start = _parse_seq(last_event_id)
        return StreamingResponse(follow(request, job_id, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    rows, has_more = service.list_events(db, project, job_id, after, limit)
    return page([service.event_out(e) for e in rows], has_more)


def _parse_seq(value: str | None) -> int:
    if not value:
        return 0
    try:
        return int(value)
    except ValueError:
        raise InvalidRequest("Last-Event-ID must be an event sequence number.",
                             param="Last-Event-ID") from None


@router.get("/jobs/{job_id}/checkpoints", response_model=ListPage[CheckpointOut])
def list_checkpoints(job_id: str, db: DB, project: CurrentProject, after: str | None = None,
                     limit: int = Query(10)) -> ListPage[CheckpointOut]:
    rows, has_more = service.list_checkpoints(db, project, job_id, after, limit)
    return page([service.checkpoint_out(c) for c in rows], has_more)


@router.get("/jobs/{job_id}/checkpoints/{checkpoint_id}/download", response_class=StreamingResponse,
            responses={202: {"model": ExportOut, "description": "A worker is building the merged model"}})
def download_checkpoint(job_id: str, checkpoint_id: str, db: DB, project: CurrentProject,
                        fmt: Annotated[download.ExportFormat | None, Query(alias="format")] = None,
                        ) -> Response:
    """Extension: a tar of the weights (`checkpoint_id` may be `final`); `format` adapter | merged | full.
    A LoRA's merged / full model is built by a worker first: 202 with its status until it is ready."""
    export = download.prepare_download(db, project, get_storage(), job_id, checkpoint_id, fmt)
    if isinstance(export, ExportOut):
        return JSONResponse(export.model_dump(mode="json"), status_code=202,
                            headers={"Retry-After": str(exports.RETRY_AFTER_SECONDS)})
    headers = {"Content-Disposition": f'attachment; filename="{export.filename}"',
               "Content-Length": str(export.content_length())}
    return StreamingResponse(export.stream(), media_type="application/x-tar", headers=headers)
