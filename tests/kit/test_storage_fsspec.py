"""FsspecStorage against fsspec's in-memory filesystem (no S3 server is reachable in tests),
plus LocalStorage.local_file."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest

from app.kit.storage import COMPLETE_MARKER, FsspecStorage, LocalStorage


@pytest.fixture
def storage(tmp_path: Path) -> FsspecStorage:
    return FsspecStorage(f"memory://bucket-{uuid.uuid4().hex[:8]}/prefix", tmp_path / "cache")


def _src_file(store: FsspecStorage, data: bytes, suffix: str = ".jsonl") -> Path:
    path = store.staging_dir() / f"{uuid.uuid4().hex}{suffix}"
    path.write_bytes(data)
    return path


def _src_dir(tmp_path: Path, files: dict[str, bytes]) -> Path:
    root = tmp_path / f"src-{uuid.uuid4().hex[:6]}"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_put_file_open_read_and_local_file(storage: FsspecStorage) -> None:
    src = _src_file(storage, b'{"text": "hi"}\n')
    storage.put_file("files/p1/file-a.jsonl", src)
    assert not src.exists()  # moved, like LocalStorage
    assert storage.exists("files/p1/file-a.jsonl")
    assert storage.size("files/p1/file-a.jsonl") == 15
    with storage.open_read("files/p1/file-a.jsonl") as fh:
        assert fh.read() == b'{"text": "hi"}\n'
    local = storage.local_file("files/p1/file-a.jsonl")
    assert local.read_bytes() == b'{"text": "hi"}\n'
    assert local.suffix == ".jsonl"
    assert storage.local_file("files/p1/file-a.jsonl") == local  # cached: downloaded once


def test_local_file_refetches_a_replaced_object(storage: FsspecStorage) -> None:
    storage.put_file("files/p/x.csv", _src_file(storage, b"a,b\n1,2\n", ".csv"))
    first = storage.local_file("files/p/x.csv")
    storage.put_file("files/p/x.csv", _src_file(storage, b"a,b\n3,4\n5,6\n", ".csv"))
    second = storage.local_file("files/p/x.csv")
    assert second != first
    assert second.read_bytes() == b"a,b\n3,4\n5,6\n"
    assert first.read_bytes() == b"a,b\n1,2\n"  # a reader of the old copy keeps it


def test_local_file_missing(storage: FsspecStorage) -> None:
    with pytest.raises(FileNotFoundError):
        storage.local_file("files/p/nope.jsonl")


def test_put_dir_and_local_dir(storage: FsspecStorage, tmp_path: Path) -> None:
    src = _src_dir(tmp_path, {"config.json": b"{}", "training_state/rng.safetensors": b"\x00\x01"})
    storage.put_dir("jobs/j1/checkpoints/step-00000010", src)
    assert not src.exists()
    assert storage.exists("jobs/j1/checkpoints/step-00000010/config.json")
    local = storage.local_dir("jobs/j1/checkpoints/step-00000010")
    assert (local / "config.json").read_bytes() == b"{}"
    assert (local / "training_state" / "rng.safetensors").read_bytes() == b"\x00\x01"
    assert not (local / COMPLETE_MARKER).exists()
    assert storage.local_dir("jobs/j1/checkpoints/step-00000010") == local
    assert not list(storage.staging_dir().iterdir())  # no temp dirs left behind


def test_put_dir_replaces_a_previous_version(storage: FsspecStorage, tmp_path: Path) -> None:
    storage.put_dir("jobs/j2/final", _src_dir(tmp_path, {"a.bin": b"old", "stale.bin": b"x"}))
    old = storage.local_dir("jobs/j2/final")
    storage.put_dir("jobs/j2/final", _src_dir(tmp_path, {"a.bin": b"new"}))
    new = storage.local_dir("jobs/j2/final")
    assert new != old
    assert (new / "a.bin").read_bytes() == b"new"
    assert not (new / "stale.bin").exists()
    assert not storage.exists("jobs/j2/final/stale.bin")


def test_incomplete_dir_is_not_read(storage: FsspecStorage) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe_file(storage._k("jobs/j3/final/model.safetensors"), b"half")  # no _COMPLETE marker
    with pytest.raises(FileNotFoundError):
        storage.local_dir("jobs/j3/final")


def test_delete_file_and_dir(storage: FsspecStorage, tmp_path: Path) -> None:
    storage.put_file("files/p/f.jsonl", _src_file(storage, b"{}\n"))
    storage.put_dir("jobs/j4/final", _src_dir(tmp_path, {"w.bin": b"1"}))
    storage.delete("files/p/f.jsonl")
    storage.delete("jobs/j4/final")
    storage.delete("jobs/never-written")  # no error
    assert not storage.exists("files/p/f.jsonl")
    assert not storage.exists("jobs/j4/final")
    with pytest.raises(FileNotFoundError):
        storage.local_dir("jobs/j4/final")


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "", "a//b"])
def test_rejects_bad_keys(storage: FsspecStorage, key: str) -> None:
    with pytest.raises(ValueError):
        storage.exists(key)


def test_local_storage_local_file(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "artifacts")
    src = store.staging_dir() / "u.jsonl"
    src.write_bytes(b"{}\n")
    store.put_file("files/p/u.jsonl", src)
    assert store.local_file("files/p/u.jsonl") == store.path("files/p/u.jsonl")
    with pytest.raises(FileNotFoundError):
        store.local_file("files/p/missing.jsonl")
