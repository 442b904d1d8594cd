"""Leftover cleanup against the database (app.jobs.cleanup): a live job's scratch dir and every
key a row names survive; a dead worker's scratch and bytes of a commit that failed go (defect 8)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.jobs.cleanup import clean_leftovers
from app.kit.db import utcnow
from app.kit.storage import LocalStorage
from app.orm import File, Job
from tests.jobs.worker_factories import committed_job
from tests.kit.test_storage_cleanup import HOUR, _age, _make


def test_clean_leftovers(committed_db: sessionmaker[Session], tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    running = committed_job(committed_db, status="running", lease_owner="w",
                            lease_expires_at=utcnow() + timedelta(minutes=5))
    dead = committed_job(committed_db, status="running", lease_owner="w2",
                         lease_expires_at=utcnow() - timedelta(minutes=5))
    with committed_db.begin() as s:  # the File row committed_job made names this key
        s.execute(update(File).values(storage_key="files/p/file-kept.jsonl"))
        s.execute(update(Job).where(Job.id == running).values(config={"init_checkpoint_key": "jobs/x/ckpt"}))
    entries = [
        _make(store.staging_dir() / f"{running}-abc" / "w.bin"),
        _make(store.staging_dir() / f"{dead}-def" / "w.bin"),
        _make(store.path("files/p/file-kept.jsonl")),
        _make(store.path("jobs/x/ckpt/model.bin")),
        _make(store.path("files/p/file-lost.jsonl")),
    ]
    for p in entries:
        _age(p.parent if "staging" in str(p) else p, 7 * HOUR)

    assert clean_leftovers(store) == {"staging": 1, "orphans": 1}
    assert [p.exists() for p in entries] == [True, False, True, True, False]
