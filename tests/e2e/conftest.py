"""Real processes: the API under uvicorn and Celery workers, talking to the test Postgres and
Redis (or, without them, SQLite and the filesystem broker)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.auth.service import create_api_key, get_or_create_project
from app.server import inference_command, worker_command

if TYPE_CHECKING:
    from tests.e2e.faults import ThrowawayPostgres, ThrowawayRedis

ROOT = Path(__file__).resolve().parents[2]
FAST_LEASES = {"TUNEHOUSE_LEASE_SECONDS": "6", "TUNEHOUSE_HEARTBEAT_SECONDS": "1",
               "TUNEHOUSE_REAPER_INTERVAL_SECONDS": "2"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(FAST_LEASES)
    env.update({"PYTHONUNBUFFERED": "1", "TUNEHOUSE_LOG_JSON": "true",
                "TUNEHOUSE_INTERNAL_TOKEN": "e2e-internal-token", **extra})  # the API's and inference worker's
    return env


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(url)


class Proc:
    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.fh = open(log, "wb")  # noqa: SIM115
        self.p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self.fh, stderr=subprocess.STDOUT,
                                  start_new_session=True)

    def kill9(self) -> None:
        """kill -9 the whole process group (Celery parent and children)."""
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(10)

    def stop(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()
        self.fh.close()

    def tail(self, n: int = 4000) -> str:
        return self.log.read_bytes()[-n:].decode(errors="replace")


@pytest.fixture
def api_key(committed_db: sessionmaker[Session]) -> str:
    with committed_db() as s:
        key = create_api_key(s, get_or_create_project(s, "e2e"), "e2e")
        s.commit()
    return key


@pytest.fixture
def live_server(api_key: str, tmp_path: Path) -> Iterator[str]:
    """The API under uvicorn plus the inference worker it forwards to (as in production)."""
    port, infer_port = free_port(), free_port()
    infer_url = f"http://127.0.0.1:{infer_port}"
    inference = Proc(inference_command("127.0.0.1", infer_port), service_env(), tmp_path / "inference.log")
    cmd = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning"]
    proc = Proc(cmd, service_env(TUNEHOUSE_INFERENCE_URL=infer_url), tmp_path / "api.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        wait_http(f"{infer_url}/healthz", timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()
        inference.stop()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    procs: list[Proc] = []

    def start(queues: str = "training,default", **env: str) -> Proc:
        proc = Proc(worker_command(queues), service_env(**env), tmp_path / f"worker{len(procs)}.log")
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        p.stop()


def wait_for(fn: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(autouse=True)
def _flush_broker() -> None:
    url = os.environ.get("TUNEHOUSE_BROKER_URL", "")
    if url.startswith("redis"):
        import redis

        redis.Redis.from_url(url).flushdb()


# --- throwaway services for fault injection (tests/e2e/faults.py): safe to kill -9 and restart ---

def _need_fault_binaries() -> None:
    from tests.e2e.faults import missing_binaries

    if missing := missing_binaries():
        message = f"fault-injection tests need {', '.join(missing)} (scripts/test.sh installs them)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    """A private Postgres cluster (initdb once per session) on a free port."""
    from tests.e2e.faults import make_postgres

    _need_fault_binaries()
    pg = make_postgres()
    yield pg
    pg.close()


@pytest.fixture
def throwaway_redis(tmp_path: Path) -> Iterator[ThrowawayRedis]:
    """A private, non-persistent redis-server on a free port: a restart comes back empty."""
    from tests.e2e.faults import ThrowawayRedis

    _need_fault_binaries()
    server = ThrowawayRedis(tmp_path / "redis.log")
    server.start()
    yield server
    server.kill9()
