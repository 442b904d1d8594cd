"""Leftovers: entries in the storage's staging area that no live job owns (partial uploads, scratch
dirs of killed workers) and stored bytes no row references (written before a commit that failed).
Run at start-up by workers (worker/tasks.py) and the server (the reaper thread), then every
`cleanup_interval_seconds` by the reaper. Only entries older than a grace period go, so work in
flight (an upload, a checkpoint whose row is about to commit) is never touched."""

from __future__ import annotations

import logging

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.jobs.state import ExportStatus, JobStatus
from app.kit.db import session_scope, utcnow
from app.kit.storage import Storage, clean_staging, get_storage, sweep_orphans
from app.orm import Checkpoint, Export, File, FineTunedModel, Job
from app.settings import get_settings

log = logging.getLogger(__name__)

# Every key the service writes lives under these (files/<project>/..., jobs/<job>/...).
PREFIXES = ("files", "jobs")
CONFIG_KEYS = ("training_file_key", "validation_file_key", "init_checkpoint_key")


def referenced_keys(s: Session) -> set[str]:
    """Every storage key a row names, deleted rows included (their bytes go through their own path)."""
    keys: set[str] = set()
    for col in (File.storage_key, Checkpoint.storage_key, FineTunedModel.storage_key, Export.storage_key,
                Export.source_key):
        keys.update(k for k in s.scalars(select(col).distinct()) if k)
    for config in s.scalars(select(Job.config)):
        keys.update(str(config[k]) for k in CONFIG_KEYS if (config or {}).get(k))
    return keys


def _staging_owners(s: Session) -> tuple[set[str], bool]:
    """Jobs running under a live lease (their scratch dir is `<job id>-<random>`) and whether an
    export is being built (its scratch dir is `merge-<random>`)."""
    live = set(s.scalars(select(Job.id).where(Job.status == JobStatus.running, Job.lease_expires_at >= utcnow())))
    building = s.scalar(select(func.count()).select_from(Export).where(Export.status == ExportStatus.building))
    return live, bool(building)


def clean_leftovers(storage: Storage | None = None) -> dict[str, int]:
    settings = get_settings()
    storage = storage or get_storage()
    with session_scope() as s:
        live, building = _staging_owners(s)

    def in_use(name: str) -> bool:
        owner = name.rsplit("-", 1)[0]  # mkdtemp's random part has no dash
        return owner in live or (building and owner == "merge")

    staged = clean_staging(storage, settings.staging_grace_seconds, in_use)
    with session_scope() as s:
        refs = referenced_keys(s)
    orphans = [k for p in PREFIXES for k in sweep_orphans(storage, p, settings.orphan_grace_seconds, refs)]
    if staged or orphans:
        log.info("cleanup: removed %d staging entries, %d orphaned stored files", len(staged), len(orphans))
    return {"staging": len(staged), "orphans": len(orphans)}


def run_safely() -> None:
    """For start-up hooks and the reaper loop: a failed sweep is logged, never raised."""
    try:
        clean_leftovers()
    except Exception:
        log.exception("leftover cleanup failed")
