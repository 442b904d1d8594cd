"""Weights exports that take model work: a LoRA checkpoint merged into its base (`format=merged|full`
downloads). One `exports` row per (job, checkpoint, format), built once by a worker, kept in storage.

    queued -> building -> ready | failed

The API creates the row (of two concurrent requests one inserts, the other finds its row) and sends
the build task after commit. `build_export` (the worker) claims the row with a conditional update, so
a duplicate delivery finds nothing to claim; it merges outside any transaction, puts the directory
into storage atomically and records the outcome only if its claim still holds. A request re-queues a
row whose message or worker was lost (queued / building for too long), a failed row after a while,
and a ready row whose checkpoint changed since (its adapter's sha256) -- each by a conditional update,
so only one request sends the task.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.jobs.schemas import ExportOut
from app.jobs.state import ExportStatus
from app.kit import ids
from app.kit.broker import DEFAULT_QUEUE, get_celery
from app.kit.db import after_commit, session_scope, utcnow
from app.kit.errors import TunehouseError, as_tunehouse_error
from app.kit.storage import Storage, get_storage
from app.models_registry.catalog import local_base
from app.orm import Export
from app.settings import get_settings
from ml.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, INFO_FILE, read_info

log = logging.getLogger(__name__)

EXPORT_TASK = "tunehouse.build_export"
MERGED = "merged"
RETRY_AFTER_SECONDS = 5  # the 202's Retry-After
# A row in this status for this long is queued again: its message was lost, its worker died, or
# (failed) the failure may have been transient.
REQUEUE_AFTER = {ExportStatus.queued: timedelta(minutes=2), ExportStatus.building: timedelta(hours=1),
                 ExportStatus.failed: timedelta(minutes=10)}
CHUNK = 1 << 20


class ExportFailed(TunehouseError):
    status_code = 500
    type = "server_error"
    code = "export_failed"


def storage_key(job_id: str, checkpoint: str) -> str:
    return f"jobs/{job_id}/exports/{checkpoint}-{MERGED}"


def fingerprint(ckpt: Path) -> str:
    """Identifies the adapter an export is made from: a re-saved checkpoint invalidates the export."""
    h = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        with open(ckpt / name, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
    return h.hexdigest()


def export_out(row: Export, fmt: str) -> ExportOut:
    """`fmt`: the format asked for (a LoRA's `full` is its merged model)."""
    return ExportOut(id=row.id, status=row.status, format=fmt, fine_tuning_job_id=row.job_id,
                     checkpoint=row.checkpoint, created_at=int(row.created_at.timestamp()),
                     updated_at=int(row.updated_at.timestamp()), error=row.error)


# --- the API side ---------------------------------------------------------------------------------

def send_build(export_id: str) -> None:
    try:
        get_celery().send_task(EXPORT_TASK, args=[export_id], queue=DEFAULT_QUEUE)
    except Exception:  # the row stays queued: the next request after REQUEUE_AFTER sends it again
        log.exception("could not enqueue an export build", extra={"export_id": export_id})


def _find(session: Session, job_id: str, checkpoint: str) -> Export | None:
    return session.scalar(select(Export).where(Export.job_id == job_id, Export.checkpoint == checkpoint,
                                               Export.format == MERGED))


def _create(session: Session, project_id: str, job_id: str, checkpoint: str, source_key: str) -> Export:
    now = utcnow()
    row = Export(id=ids.new_id("ftexport"), project_id=project_id, job_id=job_id, checkpoint=checkpoint,
                 format=MERGED, status=ExportStatus.queued, source_key=source_key, attempt=0, created_at=now,
                 updated_at=now)
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:  # a concurrent request inserted it first (and sends the task)
        winner = _find(session, job_id, checkpoint)
        if winner is None:
            raise
        return winner
    after_commit(session, partial(send_build, row.id))
    return row


def _requeue(session: Session, row: Export, *cond: ColumnElement[bool]) -> None:
    """Back to queued if the row is still what we saw (`cond`); only the request that wins sends."""
    stmt = (update(Export).where(Export.id == row.id, Export.status == row.status, *cond)
            .values(status=ExportStatus.queued, error=None, updated_at=utcnow()))
    if cast(CursorResult[Any], session.execute(stmt)).rowcount:
        after_commit(session, partial(send_build, row.id))
    session.refresh(row)


def _ready_dir(storage: Storage, row: Export, source_sha256: str) -> Path | None:
    if row.status != ExportStatus.ready or row.storage_key is None or row.source_sha256 != source_sha256:
        return None
    try:
        path = storage.local_dir(row.storage_key)
    except FileNotFoundError:
        return None
    return path if (path / INFO_FILE).is_file() else None


def _settle(session: Session, row: Export) -> None:
    """Re-queues the row when it is due; raises for a failed row that is not."""
    if row.status == ExportStatus.ready:  # stale: the checkpoint changed or the files are gone
        _requeue(session, row, Export.attempt == row.attempt)
        return
    cutoff = utcnow() - REQUEUE_AFTER[ExportStatus(row.status)]
    if row.updated_at < cutoff:
        _requeue(session, row, Export.updated_at < cutoff)
    elif row.status == ExportStatus.failed:
        message = (row.error or {}).get("message", "The export failed.")
        retry = REQUEUE_AFTER[ExportStatus.failed].seconds // 60
        raise ExportFailed(f"{message} Ask again after {retry} minutes to retry.")


def merged_export(session: Session, storage: Storage, *, project_id: str, job_id: str, checkpoint: str,
                  source_key: str, ckpt: Path) -> Path | Export:
    """The merged model's directory when it is built and current, else the export row (created or
    re-queued here as needed; its task is sent after commit)."""
    row = _find(session, job_id, checkpoint)
    if row is None:
        return _create(session, project_id, job_id, checkpoint, source_key)
    ready = _ready_dir(storage, row, fingerprint(ckpt))
    if ready is not None:
        return ready
    _settle(session, row)
    return row


# --- the worker side ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    export_id: str
    attempt: int
    job_id: str
    checkpoint: str
    source_key: str


def _claim(export_id: str) -> Claim | None:
    with session_scope() as s:
        stmt = (update(Export).where(Export.id == export_id, Export.status == ExportStatus.queued)
                .values(status=ExportStatus.building, attempt=Export.attempt + 1, updated_at=utcnow()))
        if not cast(CursorResult[Any], s.execute(stmt)).rowcount:
            return None
        row = s.get(Export, export_id, populate_existing=True)
        assert row is not None
        return Claim(row.id, row.attempt, row.job_id, row.checkpoint, row.source_key)


def _finish(claim: Claim, **values: Any) -> bool:
    """Records the outcome only if this build still holds the row (it was not re-queued meanwhile)."""
    with session_scope() as s:
        stmt = (update(Export).where(Export.id == claim.export_id, Export.status == ExportStatus.building,
                                     Export.attempt == claim.attempt).values(updated_at=utcnow(), **values))
        return bool(cast(CursorResult[Any], s.execute(stmt)).rowcount)


def _base_dir(storage: Storage, ckpt: Path) -> Path:
    info = read_info(ckpt)
    if info.base_checkpoint_key:  # an adapter trained on a from_checkpoint full model
        return storage.local_dir(info.base_checkpoint_key)
    return local_base(info.base_model).path


def _build(storage: Storage, claim: Claim) -> tuple[str, str]:
    """(storage key, source sha256) of the merged model, put into storage atomically."""
    from ml.export import merge_lora  # torch: the worker only
    from ml.runtime import configure_threads

    configure_threads(get_settings().torch_threads)

    ckpt = storage.local_dir(claim.source_key)
    source_sha256 = fingerprint(ckpt)
    key = storage_key(claim.job_id, claim.checkpoint)
    tmp = Path(tempfile.mkdtemp(prefix="merge-", dir=storage.staging_dir()))
    try:
        merge_lora(ckpt, _base_dir(storage, ckpt), tmp)
        storage.put_dir(key, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return key, source_sha256


def build_export(export_id: str) -> str:
    """The build task's body. Duplicate deliveries and rows built meanwhile are no-ops ("skipped")."""
    claim = _claim(export_id)
    if claim is None:
        return "skipped"
    try:
        key, source_sha256 = _build(get_storage(), claim)
    except Exception as exc:
        log.exception("export build failed", extra={"export_id": export_id})
        err = as_tunehouse_error(exc, "Merging the adapter into its base model failed.")
        _finish(claim, status=ExportStatus.failed, error={"code": err.code or "export_failed", "message": err.message})
        return ExportStatus.failed
    recorded = _finish(claim, status=ExportStatus.ready, storage_key=key, source_sha256=source_sha256, error=None)
    return ExportStatus.ready if recorded else "superseded"
