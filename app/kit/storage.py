"""Artifact storage behind one interface: a local directory by default, any fsspec URL
(s3://bucket/prefix with s3fs) for many worker machines. Every write is atomic: readers see
the old object or the whole new one, never half of it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import IO, Protocol

from app.settings import get_settings


class Storage(Protocol):
    def put_file(self, key: str, src: Path) -> None: ...
    def put_dir(self, key: str, src: Path) -> None: ...
    def open_read(self, key: str) -> IO[bytes]: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def local_dir(self, key: str) -> Path: ...
    def size(self, key: str) -> int: ...
    def staging_dir(self) -> Path: ...


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root not in p.parents and p != self.root:
            raise ValueError(f"storage key escapes the root: {key!r}")
        return p

    def staging_dir(self) -> Path:
        """Scratch space on the same filesystem, so a final os.replace is atomic."""
        d = self.root / ".staging"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def put_file(self, key: str, src: Path) -> None:
        dst = self.path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb+") as f:
            os.fsync(f.fileno())
        if src.stat().st_dev != self.root.stat().st_dev:
            tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
            shutil.copyfile(src, tmp)
            src.unlink()
            src = tmp
        os.replace(src, dst)
        _fsync_dir(dst.parent)

    def put_dir(self, key: str, src: Path) -> None:
        """Move a finished directory into place; an existing one is swapped out atomically."""
        dst = self.path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        staged = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
        shutil.copytree(src, staged) if src.stat().st_dev != self.root.stat().st_dev else os.rename(src, staged)
        for f in staged.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        if dst.exists():
            old = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.old")
            os.rename(dst, old)
            os.rename(staged, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staged, dst)
        _fsync_dir(dst.parent)

    def open_read(self, key: str) -> IO[bytes]:
        return open(self.path(key), "rb")

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size

    def delete(self, key: str) -> None:
        p = self.path(key)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

    def local_dir(self, key: str) -> Path:
        return self.path(key)


class FsspecStorage:
    """Object storage (S3-compatible via s3fs). Objects are written under a temporary key and
    renamed/copied into place; directories get a `_COMPLETE` marker written last."""

    def __init__(self, url: str, cache_dir: Path) -> None:
        import fsspec

        self.fs, self.base = fsspec.core.url_to_fs(url)
        self.cache = cache_dir
        self.cache.mkdir(parents=True, exist_ok=True)

    def _k(self, key: str) -> str:
        return f"{self.base.rstrip('/')}/{key}"

    def staging_dir(self) -> Path:
        d = self.cache / ".staging"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def put_file(self, key: str, src: Path) -> None:
        self.fs.put_file(str(src), self._k(key))  # S3 PUT is atomic per object
        src.unlink(missing_ok=True)

    def put_dir(self, key: str, src: Path) -> None:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                self.fs.put_file(str(f), self._k(f"{key}/{f.relative_to(src).as_posix()}"))
        with self.fs.open(self._k(f"{key}/_COMPLETE"), "wb") as fh:
            fh.write(b"ok")
        shutil.rmtree(src, ignore_errors=True)

    def open_read(self, key: str) -> IO[bytes]:
        return self.fs.open(self._k(key), "rb")  # type: ignore[no-any-return]

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._k(key)))

    def size(self, key: str) -> int:
        return int(self.fs.size(self._k(key)))

    def delete(self, key: str) -> None:
        if self.fs.exists(self._k(key)):
            self.fs.rm(self._k(key), recursive=True)

    def local_dir(self, key: str) -> Path:
        """Download a directory once into the local cache (atomically) and return it."""
        dst = self.cache / key
        if dst.exists():
            return dst
        if not self.fs.exists(self._k(f"{key}/_COMPLETE")):
            raise FileNotFoundError(key)
        tmp = Path(tempfile.mkdtemp(dir=self.staging_dir()))
        self.fs.get(self._k(key) + "/", str(tmp), recursive=True)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.rename(tmp, dst)
        return dst


@contextlib.contextmanager
def staged_file(storage: Storage, suffix: str = "") -> Iterator[Path]:
    """A temp file in the storage's staging area, removed if not moved into place."""
    fd, name = tempfile.mkstemp(dir=storage.staging_dir(), suffix=suffix)
    os.close(fd)
    path = Path(name)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


@lru_cache
def get_storage() -> Storage:
    settings = get_settings()
    url = settings.resolved_artifact_url
    if "://" in url and not url.startswith("file://"):
        return FsspecStorage(url, settings.data_dir.resolve() / "cache")
    return LocalStorage(Path(url.removeprefix("file://")))
