"""`tunehouse serve` never orphans the workers it supervises: SIGTERM (docker stop, systemd) stops
them like Ctrl-C does, and even a kill -9 of the server takes them down (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import Proc, free_port, service_env, wait_for, wait_http

pytestmark = pytest.mark.slow


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _serve(tmp_path: Path, name: str) -> tuple[Proc, set[int]]:
    port = free_port()
    env = service_env(TUNEHOUSE_DATA_DIR=str(tmp_path / name))
    for var in ("TUNEHOUSE_DATABASE_URL", "TUNEHOUSE_BROKER_URL", "TUNEHOUSE_ARTIFACT_URL", "TUNEHOUSE_INFERENCE_URL"):
        env.pop(var, None)
    server = Proc([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env, tmp_path / f"{name}.log")
    wait_http(f"http://127.0.0.1:{port}/healthz", timeout=90)
    children = wait_for(lambda: c if len(c := _children(server.p.pid)) >= 3 else None, 60,
                        "the training, default-queue and inference workers")
    return server, children


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_the_supervised_workers_die_with_the_server(tmp_path: Path, sig: signal.Signals) -> None:
    server, children = _serve(tmp_path, sig.name.lower())
    try:
        os.kill(server.p.pid, sig)
        wait_for(lambda: not _alive(children), 60, f"workers gone after {sig.name}", every=0.2)
        server.p.wait(30)
    finally:
        for pid in _alive(children):
            os.kill(pid, signal.SIGKILL)
        server.stop()
