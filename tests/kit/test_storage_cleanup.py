"""Leftover sweeps of app.kit.storage: stale staging entries and unreferenced stored files go,
anything fresh, in use or referenced stays (defect 8)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from unittest import mock

from app.kit.storage import COMPLETE_MARKER, FsspecStorage, LocalStorage, clean_staging, sweep_orphans

HOUR = 3600.0


def _age(path: Path, seconds: float) -> None:
    """Backdate a file or a whole tree."""
    stamp = time.time() - seconds
    for p in [*(path.rglob("*") if path.is_dir() else []), path]:
        os.utime(p, (stamp, stamp))


def _make(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_clean_staging_removes_stale_unowned_entries(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    staging = store.staging_dir()
    dead = staging / "ftjob-dead-abc123"  # a killed worker's scratch dir
    _make(dead / "ckpt" / "weights.bin", b"0" * 1024)
    live = staging / "ftjob-live-def456"  # a long-running job: untouched for a while, still owned
    _make(live / "state.bin")
    upload = _make(staging / "tmpq1w2e3.upload")  # a partial upload of a killed request
    busy = staging / "merge-zz9"  # old dir, but a file in it is being written now
    _make(busy / "old.bin")
    fresh = _make(staging / "tmpfresh.jsonl")
    for p in (dead, live, upload, busy):
        _age(p, 2 * HOUR)
    _make(busy / "new.bin")

    removed = clean_staging(store, HOUR, in_use=lambda name: name.startswith("ftjob-live-"))

    assert sorted(removed) == sorted([dead.name, upload.name])
    assert live.is_dir() and busy.is_dir() and fresh.is_file() and not dead.exists()


def test_sweep_orphans_keeps_referenced_and_fresh(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    kept_file = _make(store.path("files/p1/file-1.jsonl"))
    kept_dir = _make(store.path("jobs/j1/checkpoints/step-00000010/model.bin")).parent
    orphan_file = _make(store.path("files/p1/file-2.jsonl"))  # its row never committed
    orphan_dir = _make(store.path("jobs/j2/final-1/model.bin")).parent
    half_written = _make(store.path("jobs/j1/checkpoints/.step-00000020.abc.tmp/model.bin")).parent
    fresh_orphan = store.path("jobs/j3/final-1/model.bin")  # a row about to commit
    for p in (kept_file, kept_dir, orphan_file, orphan_dir, half_written):
        _age(p, 7 * HOUR)
    _make(fresh_orphan)
    refs = {"files/p1/file-1.jsonl", "jobs/j1/checkpoints/step-00000010"}

    swept = [k for prefix in ("files", "jobs") for k in sweep_orphans(store, prefix, 6 * HOUR, refs)]

    assert sorted(swept) == ["files/p1/file-2.jsonl", "jobs/j1/checkpoints/.step-00000020.abc.tmp/model.bin",
                             "jobs/j2/final-1/model.bin"]
    assert kept_file.is_file() and (kept_dir / "model.bin").is_file() and fresh_orphan.is_file()
    assert not store.path("jobs/j2").exists()  # emptied directories go too
    assert not half_written.exists() and store.path("jobs/j1/checkpoints").is_dir()


def test_sweep_orphans_on_object_storage(tmp_path: Path) -> None:
    """Object keys and times come from fsspec's listing (here its in-memory filesystem)."""
    store = FsspecStorage(f"memory://bucket-{uuid.uuid4().hex[:8]}/prefix", tmp_path / "cache")
    for key in ("files/p/kept.jsonl", "files/p/lost.jsonl", "jobs/j/final-1/model.bin"):
        store.fs.pipe_file(store._k(key), b"x")
    store.fs.pipe_file(store._k(f"jobs/j/final-1/{COMPLETE_MARKER}"), b"v1")
    assert sweep_orphans(store, "files", 6 * HOUR, set()) == []  # all of them are new
    later = time.time() + 7 * HOUR  # look from the future instead of backdating objects
    refs = {"files/p/kept.jsonl", "jobs/j/final-1"}
    with mock.patch("app.kit.storage.time.time", return_value=later):
        swept = [k for prefix in ("files", "jobs") for k in sweep_orphans(store, prefix, 6 * HOUR, refs)]
    assert swept == ["files/p/lost.jsonl"]
    assert store.exists("files/p/kept.jsonl") and store.local_dir("jobs/j/final-1").is_dir()
