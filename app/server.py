"""Process orchestration for `tunehouse serve`: migrations, bootstrap key, and in embedded mode the
worker processes the API supervises: a training worker and a default-queue worker (webhooks,
exports) on the filesystem broker, and an inference worker. The API process itself never imports
torch: every piece of model work runs in one of those."""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from app.auth.service import KEY_PREFIX, create_api_key, get_or_create_project
from app.kit.broker import DEFAULT_QUEUE, TRAINING_QUEUE
from app.kit.db import session_scope
from app.kit.migrate import upgrade_head
from app.settings import Settings

log = logging.getLogger(__name__)


def ensure_bootstrap_key(settings: Settings) -> str | None:
    """The configured key, or in embedded mode one generated once and kept in data_dir."""
    key = settings.bootstrap_api_key
    key_file = settings.data_dir / "api_key"
    if not key and settings.embedded:
        key = key_file.read_text().strip() if key_file.exists() else KEY_PREFIX + secrets.token_urlsafe(24)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
    if not key:
        return None
    with session_scope() as s:
        create_api_key(s, get_or_create_project(s, settings.bootstrap_project), "bootstrap", key=key)
    return key


def prepare(settings: Settings) -> str | None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_head(settings.resolved_database_url)
    return ensure_bootstrap_key(settings)


def worker_command(queues: str, concurrency: int = 1, pool: str = "solo") -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app:app", "worker", "-Q", queues,
            "-c", str(concurrency), "-P", pool, "--prefetch-multiplier", "1", "--without-gossip",
            "--without-mingle", "-l", "INFO", "-n", f"tunehouse-{queues.replace(',', '-')}@%h"]


def inference_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "worker.inference_server", "--host", host, "--port", str(port)]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def embedded_children(settings: Settings) -> list[list[str]]:
    """The processes embedded mode supervises; points the API at its inference worker, with a fresh
    shared secret for its /internal API unless one is configured."""
    commands = [worker_command(TRAINING_QUEUE), worker_command(DEFAULT_QUEUE)]
    if not settings.inference_url:
        port = free_port()
        settings.inference_url = f"http://127.0.0.1:{port}"
        os.environ["TUNEHOUSE_INFERENCE_URL"] = settings.inference_url  # the children read it too
        if not settings.internal_token:  # the shared secret of the API and its inference worker
            settings.internal_token = secrets.token_urlsafe(32)
            os.environ["TUNEHOUSE_INTERNAL_TOKEN"] = settings.internal_token
        commands.append(inference_command("127.0.0.1", port))
    return commands


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: Linux kills it when the server that started it dies, even by
    kill -9, so no worker outlives its server."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class SupervisedWorker(threading.Thread):
    """Keeps one worker process alive; a dead worker is restarted (its job resumes via the reaper).
    The child dies with this thread's process (PR_SET_PDEATHSIG on Linux)."""

    def __init__(self, cmd: list[str], cwd: Path | None = None) -> None:
        super().__init__(name="worker-supervisor", daemon=True)
        self.cmd, self.cwd = cmd, cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        while not self.stopping.is_set():
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=os.environ.copy(), preexec_fn=preexec)
            code = self.proc.wait()
            if self.stopping.is_set():
                return
            log.warning("embedded worker exited with %s; restarting in 2 s", code)
            self.stopping.wait(2)

    def stop(self) -> None:
        self.stopping.set()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def exit_on_sigterm() -> None:
    """uvicorn shuts down gracefully on SIGTERM, then re-raises it with the previous handler: make that
    handler a normal exit so `serve`'s cleanup (stopping the supervised workers) runs, as on Ctrl-C."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
