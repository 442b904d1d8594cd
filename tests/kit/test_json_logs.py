"""Logs are JSON lines in every process: a real `tunehouse serve` (uvicorn's own start-up, access and
shutdown lines included) and a real Celery worker write nothing else to stderr; request records carry
the request id, which the response echoes. Plus the request id rules and the log context, in process."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from app.kit.logging import JsonFormatter, log_context
from app.kit.request_id import request_id_from

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _embedded_env(data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "TUNEHOUSE_"))}
    env.update(TUNEHOUSE_DATA_DIR=str(data), TUNEHOUSE_LOG_JSON="true", PYTHONUNBUFFERED="1")
    return env


def _wait(ok: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.2)
    raise TimeoutError(what)


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _json_lines(path: Path) -> list[dict[str, object]]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    bad = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            bad.append(line)
    assert bad == [], f"{len(bad)} of {len(lines)} stderr lines are not JSON: {bad[:5]}"
    return [json.loads(line) for line in lines]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_serve_writes_only_json_lines_with_request_ids(tmp_path: Path) -> None:
    port, err = _free_port(), tmp_path / "serve.err"
    cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--no-worker"]
    with err.open("wb") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_embedded_env(tmp_path / "data"), stdout=subprocess.DEVNULL,
                                stderr=stderr)
    try:
        _wait(lambda: _up(f"http://127.0.0.1:{port}/healthz"), 90, "tunehouse serve")
        r = httpx.get(f"http://127.0.0.1:{port}/v1/files", headers={"X-Request-ID": "client-req-42"})
        assert r.status_code == 401 and r.headers["x-request-id"] == "client-req-42"
        generated = httpx.get(f"http://127.0.0.1:{port}/healthz").headers["x-request-id"]
    finally:
        _stop(proc)
    records = _json_lines(err)
    access = [r for r in records if r["logger"] == "uvicorn.access"]
    assert {r.get("request_id") for r in access} >= {"client-req-42", generated}
    assert any("Started server process" in str(r["msg"]) for r in records)


def test_celery_worker_writes_only_json_lines(tmp_path: Path) -> None:
    err = tmp_path / "worker.err"
    cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app:app", "worker", "-Q", "default", "-P", "solo",
           "-c", "1", "--without-gossip", "--without-mingle", "-l", "INFO", "-n", "logtest@%h"]
    with err.open("wb") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_embedded_env(tmp_path / "data"), stdout=subprocess.DEVNULL,
                                stderr=stderr)
    try:
        _wait(lambda: " ready." in err.read_text() or proc.poll() is not None, 90, "the Celery worker")
    finally:
        _stop(proc)
    assert any(str(r["msg"]).endswith(" ready.") for r in _json_lines(err))


def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123_x.y:z"}).headers["x-request-id"] == "abc-123_x.y:z"
    for bad in ("has space", "x" * 129, "quote\"d", ""):
        echoed = client.get("/healthz", headers={"X-Request-ID": bad}).headers["x-request-id"]
        assert echoed.startswith("req_") and echoed != bad
    first, second = (client.get("/healthz").headers["x-request-id"] for _ in range(2))
    assert first != second
    assert request_id_from("\u00e9t\u00e9").startswith("req_")


def test_log_context_rides_on_every_record() -> None:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "step %d", (3,), None)
    with log_context(job_id="ftjob-1", attempt=2):
        line = json.loads(JsonFormatter().format(record))
    assert (line["msg"], line["job_id"], line["attempt"]) == ("step 3", "ftjob-1", 2)
    assert "job_id" not in json.loads(JsonFormatter().format(record))
