"""A 200 MB upload through a real uvicorn process: the server's RSS must stay flat
(the body is streamed to disk and validated line by line, never held in memory)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.auth.service import create_api_key, get_or_create_project
from app.orm import File

ROOT = Path(__file__).resolve().parents[2]
TOTAL_MB = 200
MAX_GROWTH_MB = 60
BOUNDARY = "tunehouse-memory-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_server() -> Iterator[tuple[str, psutil.Process]]:
    """uvicorn in its own process, configured from this process's TUNEHOUSE_* env (set by conftest)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "server exited during start-up"
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        yield url, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


class RssSampler(threading.Thread):
    def __init__(self, proc: psutil.Process) -> None:
        super().__init__(daemon=True)
        self.proc, self.peak, self.done = proc, proc.memory_info().rss, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)


def _block() -> bytes:
    """~1 MiB of chat lines."""
    record = {"messages": [{"role": "user", "content": "q" * 400},
                           {"role": "assistant", "content": "a" * 500}]}
    line = json.dumps(record).encode() + b"\n"
    return line * ((1 << 20) // len(line))


def _body(block: bytes, blocks: int, hasher: hashlib._Hash) -> Iterator[bytes]:
    """A multipart body generated on the fly (chunked); the file part is `blocks` copies of `block`."""
    yield (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
           f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
           "Content-Type: application/jsonl\r\n\r\n").encode()
    for _ in range(blocks):
        hasher.update(block)
        yield block
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def _post(url: str, key: str, content: Iterator[bytes]) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    return httpx.post(f"{url}/v1/files", content=content, headers=headers, timeout=600)


@pytest.mark.slow
def test_200mb_upload_keeps_server_memory_flat(committed_db: sessionmaker[Session]) -> None:
    with committed_db() as s:
        key = create_api_key(s, get_or_create_project(s, "memory-test"), "memory")
        s.commit()
    block = _block()
    blocks = TOTAL_MB * (1 << 20) // len(block)
    with live_server() as (url, proc):
        warm = _post(url, key, _body(block, 2, hashlib.sha256()))  # first-request imports and pools
        assert warm.status_code == 200, warm.text
        before = proc.memory_info().rss
        sampler = RssSampler(proc)
        sampler.start()
        hasher = hashlib.sha256()
        t0 = time.perf_counter()
        r = _post(url, key, _body(block, blocks, hasher))
        elapsed = time.perf_counter() - t0
        sampler.done.set()
        sampler.join()
        assert r.status_code == 200, r.text
        body = r.json()
        size = blocks * len(block)
        assert body["bytes"] == size and body["rows"] == size // (len(block) // block.count(b"\n"))
        with committed_db() as s:
            row = s.get(File, body["id"])
            assert row is not None and row.sha256 == hasher.hexdigest()
        after = proc.memory_info().rss
        growth = (sampler.peak - before) / 2**20
        mib = 2**20
        print(f"\n[upload memory] {size / mib:.0f} MiB in {elapsed:.1f}s = {size / mib / elapsed:.0f} MiB/s; "
              f"server RSS before {before / mib:.0f} MiB, peak {sampler.peak / mib:.0f} MiB, "
              f"after {after / mib:.0f} MiB; peak growth {growth:.1f} MiB")
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.delete(f"{url}/v1/files/{body['id']}", headers=headers).status_code == 200
        assert httpx.delete(f"{url}/v1/files/{warm.json()['id']}", headers=headers).status_code == 200
    assert growth < MAX_GROWTH_MB
