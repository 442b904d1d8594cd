"""Artifact storage behind one interface: a local directory by default, any fsspec URL
(s3://bucket/prefix with s3fs) for many worker machines. Every write is atomic: readers see
the old object or the whole new one, never half of it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from datetime import datetime
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
    def local_file(self, key: str) -> Path: ...
    def size(self, key: str) -> int: ...
    def staging_dir(self) -> Path: ...
    def iter_files(self, prefix: str) -> Iterator[tuple[str, float]]: ...


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
        if src.stat().st_dev != self.root.stat().st_dev:
            shutil.copytree(src, staged)
            shutil.rmtree(src, ignore_errors=True)
        else:
            os.rename(src, staged)
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

    def iter_files(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, mtime) of every stored file under `prefix` (for the orphan sweep)."""
        top = self.path(prefix)
        for dirpath, _, names in os.walk(top):
            for name in names:
                p = Path(dirpath) / name
                with contextlib.suppress(FileNotFoundError):
                    yield p.relative_to(self.root).as_posix(), p.lstat().st_mtime

    def prune_empty_dirs(self, keys: Collection[str], prefix: str) -> None:
        """The directories that held `keys`, once emptied by a sweep (deepest first, up to `prefix`)."""
        stop = self.path(prefix)
        dirs = {p for key in keys for p in self.path(key).parents if stop in p.parents}
        for d in sorted(dirs, key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                d.rmdir()  # fails while not empty

    def local_file(self, key: str) -> Path:
        p = self.path(key)
        if not p.is_file():
            raise FileNotFoundError(key)
        return p


class FsspecStorage:
    """Object storage (S3-compatible via s3fs, or any fsspec URL). Files are single PUTs (atomic per
    object). A directory is a prefix whose `_COMPLETE` marker, written last, holds a version token:
    readers never take a prefix without it, and a download is kept only if the token is unchanged
    after it. Local copies are cached per version, so a replaced object is fetched again while
    readers of the old copy keep theirs."""

    def __init__(self, url: str, cache_dir: Path) -> None:
        import fsspec

        self.fs, self.base = fsspec.core.url_to_fs(url)
        self.base = self.base.rstrip("/")
        self.cache = cache_dir
        self.cache.mkdir(parents=True, exist_ok=True)

    def _k(self, key: str) -> str:
        parts = key.strip("/").split("/")
        if not key.strip("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid storage key: {key!r}")
        return f"{self.base}/{'/'.join(parts)}"

    def staging_dir(self) -> Path:
        d = self.cache / ".staging"
        d.mkdir(parents=True, exist_ok=True)
        return d

    # --- writes ---------------------------------------------------------------------------

    def put_file(self, key: str, src: Path) -> None:
        self.fs.put_file(str(src), self._k(key))
        src.unlink(missing_ok=True)

    def put_dir(self, key: str, src: Path) -> None:
        """Upload a finished directory; an existing one is withdrawn (marker first) and replaced."""
        if self.fs.exists(self._k(key)):
            self.delete(key)
        files = sorted(f for f in src.rglob("*") if f.is_file() and f.name != COMPLETE_MARKER)
        if files:
            self.fs.put([str(f) for f in files],
                        [self._k(f"{key}/{f.relative_to(src).as_posix()}") for f in files])
        self.fs.pipe_file(self._k(f"{key}/{COMPLETE_MARKER}"), uuid.uuid4().hex.encode())
        shutil.rmtree(src, ignore_errors=True)

    def delete(self, key: str) -> None:
        marker = self._k(f"{key}/{COMPLETE_MARKER}")
        if self.fs.exists(marker):
            self.fs.rm_file(marker)  # readers stop taking the directory before any file goes
        if self.fs.exists(self._k(key)):
            self.fs.rm(self._k(key), recursive=True)
        self.fs.invalidate_cache()

    # --- reads ----------------------------------------------------------------------------

    def open_read(self, key: str) -> IO[bytes]:
        return self.fs.open(self._k(key), "rb")  # type: ignore[no-any-return]

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._k(key)))

    def size(self, key: str) -> int:
        return int(self.fs.size(self._k(key)))

    def iter_files(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, mtime) of every stored object under `prefix`; an object whose time is unknown is
        reported as new (never swept)."""
        base = self.base + "/"
        found = self.fs.find(self._k(prefix), detail=True)
        for path, info in (found.items() if isinstance(found, dict) else []):
            if str(path).startswith(base):
                yield str(path)[len(base):], _mtime(info)

    def _dir_version(self, key: str) -> str:
        try:
            token = bytes(self.fs.cat_file(self._k(f"{key}/{COMPLETE_MARKER}"))).decode().strip()
        except FileNotFoundError:
            raise FileNotFoundError(f"no complete directory at {key!r}") from None
        return _token(token)

    def local_dir(self, key: str) -> Path:
        """The directory, downloaded once per version into the local cache (atomically)."""
        version = self._dir_version(key)
        dst = self.cache / "dirs" / f"{self._k(key).lstrip('/')}@{version}"
        if dst.is_dir():
            return dst
        tmp = Path(tempfile.mkdtemp(dir=self.staging_dir()))
        try:
            self._download_dir(key, tmp)
            if self._dir_version(key) != version:
                raise FileNotFoundError(f"{key!r} was replaced during download; try again")
            _publish(tmp, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dst

    def _download_dir(self, key: str, into: Path) -> None:
        prefix = self._k(key) + "/"
        remote = [p for p in self.fs.find(prefix) if not p.endswith(f"/{COMPLETE_MARKER}")]
        local = [into / p[len(prefix):] for p in remote]
        for path in local:
            path.parent.mkdir(parents=True, exist_ok=True)
        if remote:
            self.fs.get(remote, [str(p) for p in local])

    def local_file(self, key: str) -> Path:
        """The object, downloaded once per version into the local cache (atomically)."""
        path = self._k(key)
        version = _token(str(self.fs.ukey(path)))  # FileNotFoundError when absent
        name = path.rsplit("/", 1)[-1]
        dst = self.cache / "files" / path.lstrip("/") / f"{version}-{name}"
        if dst.is_file():
            return dst
        fd, tmp_name = tempfile.mkstemp(dir=self.staging_dir(), suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            self.fs.get_file(path, str(tmp))
            if tmp.stat().st_size != self.size(key):
                raise OSError(f"short download of {key!r}")
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        return dst


COMPLETE_MARKER = "_COMPLETE"


def _mtime(info: dict[str, object]) -> float:
    for field in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(field)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
    return time.time()


def _token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _publish(tmp: Path, dst: Path) -> None:
    """Rename a finished download into place; losing the race to another process is fine."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, dst)
    except OSError:
        if not dst.is_dir():
            raise


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


# --- leftovers ------------------------------------------------------------------------------

def _newest_mtime(path: Path) -> float:
    """Newest modification under `path`: a scratch dir still being written to is not stale."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirs, names in os.walk(path):
            for name in (*dirs, *names):
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, (Path(dirpath) / name).lstat().st_mtime)
    return newest


def clean_staging(storage: Storage, grace_seconds: float, in_use: Callable[[str], bool]) -> list[str]:
    """Remove staging entries (partial uploads, scratch dirs of killed workers) untouched for
    `grace_seconds`, except those `in_use(name)` claims (a live job's scratch dir). Their names."""
    cutoff = time.time() - grace_seconds
    removed = []
    for entry in list(storage.staging_dir().iterdir()):
        try:
            if in_use(entry.name) or _newest_mtime(entry) > cutoff:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:
            continue  # its owner finished meanwhile
        removed.append(entry.name)
    return removed


def sweep_orphans(storage: Storage, prefix: str, grace_seconds: float, referenced: Collection[str]) -> list[str]:
    """Delete stored files under `prefix` older than `grace_seconds` that no referenced key is, or
    holds (a referenced directory keeps all its files): bytes whose row never committed, and the
    leftovers of interrupted atomic writes. Returns the deleted keys."""
    cutoff = time.time() - grace_seconds
    refs = set(referenced)
    doomed = [key for key, mtime in storage.iter_files(prefix)
              if mtime < cutoff and not _held(key, refs)]
    for key in doomed:
        storage.delete(key)
    if isinstance(storage, LocalStorage) and doomed:
        storage.prune_empty_dirs(doomed, prefix)
    return doomed


def _held(key: str, refs: set[str]) -> bool:
    parts = key.split("/")
    return any("/".join(parts[:i]) in refs for i in range(1, len(parts) + 1))


@lru_cache
def get_storage() -> Storage:
    settings = get_settings()
    url = settings.resolved_artifact_url
    if "://" in url and not url.startswith("file://"):
        return FsspecStorage(url, settings.data_dir.resolve() / "cache")
    return LocalStorage(Path(url.removeprefix("file://")))
