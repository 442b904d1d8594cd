"""Fault injection on real processes: kill -9 a training worker, kill -9 Redis and bring it back
empty, crash-restart Postgres mid-training, kill -9 the API mid-upload, a database blip while
progress is written. Each runs on a throwaway Postgres cluster and redis-server (tests/e2e/faults.py)
and checks the same guarantees afterwards: the job finished exactly once, no checkpoint lost or
duplicated, one metric history with every step once in the result CSV."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from app.orm import File
from tests.e2e.conftest import Proc
from tests.e2e.data import chat_rows, write_jsonl
from tests.e2e.faults import Stack, ThrowawayPostgres, ThrowawayRedis

pytestmark = pytest.mark.slow

# Checkpoint every 20 steps; 160 rows / batch 4 -> 40 steps an epoch, 240 in all. Long enough that a fault
# injected after step 2 or the first checkpoint lands mid-training even on an idle machine (tiny-lm
# trains ~30 steps/s there and progress is reported every 2 s: 60 steps made it a race).
EVERY = 20


@pytest.fixture
def stack(request: pytest.FixtureRequest, throwaway_postgres: ThrowawayPostgres,
          throwaway_redis: ThrowawayRedis, start_worker: Callable[..., Proc], tmp_path: Path) -> Iterator[Stack]:
    """A fresh database on the throwaway cluster and a fresh redis-server; tests add to `extra_env`
    before starting processes."""
    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:60]
    s = Stack(throwaway_postgres, throwaway_redis, throwaway_postgres.create_database(name), tmp_path,
              start_worker)
    try:
        yield s
    finally:
        s.stop()


def _train_file(stack: Stack, rows: int = 160) -> str:
    return stack.upload(write_jsonl(stack.tmp / "train.jsonl", chat_rows(rows)))


def test_worker_kill_9_resumes_without_loss(stack: Stack) -> None:
    stack.start_api()
    job_id = stack.create_job(_train_file(stack), checkpoint_every_steps=EVERY)
    workers = [stack.start_worker(), stack.start_worker()]  # one trains, one waits
    stack.wait_checkpoint(job_id)
    first = stack.runner_of(job_id)
    stack.kill9(first)
    last = max(stack.checkpoint_steps(job_id))
    assert stack.job(job_id)["status"] == "running"
    stack.wait_finished(job_id)  # the reaper re-queues once the lease runs out; the other one resumes
    (second,) = [w for w in workers if w is not first]
    job = stack.assert_consistent(job_id, EVERY, second.tail())
    assert job["attempt"] == 2
    starts = [e.data for e in stack.events(job_id) if e.message.startswith("Fine-tuning job started")]
    assert [(d or {}).get("resumed_from_step") for d in starts] == [None, last]  # from the newest checkpoint


def test_redis_kill_9_and_empty_restart_loses_no_job(stack: Stack) -> None:
    stack.start_api()
    file_id = _train_file(stack)
    jobs = [stack.create_job(file_id, checkpoint_every_steps=EVERY) for _ in range(2)]
    worker = stack.start_worker()
    stack.wait(lambda: sorted((stack.job(j) or {}).get("status", "") for j in jobs) == ["queued", "running"],
               120, "one job to run while the other waits")
    stack.redis.restart_empty()  # kill -9: the waiting job's message and the running one's are gone
    for job_id in jobs:
        stack.wait_finished(job_id)
    for job_id in jobs:
        job = stack.assert_consistent(job_id, EVERY, worker.tail())
        assert job["attempt"] == 1  # nothing ran twice, and losing the broker cost no attempt


def test_postgres_crash_restart_mid_training(stack: Stack) -> None:
    stack.extra_env["TUNEHOUSE_LEASE_SECONDS"] = "20"  # slack for a slow restart on a busy machine
    stack.start_api()
    job_id = stack.create_job(_train_file(stack), checkpoint_every_steps=EVERY)
    worker = stack.start_worker()
    stack.wait_checkpoint(job_id)
    assert stack.job(job_id)["status"] == "running"
    stack.pg.restart()  # stop -m immediate (a crash: the start runs recovery), then start
    stack.wait_finished(job_id)
    stack.assert_consistent(job_id, EVERY, worker.tail())
    ready = stack.wait(lambda: stack.try_json("/readyz"), 30, "the API to be ready again")
    assert ready["checks"]["database"] == "ok"


def _multipart_body(boundary: str, release: threading.Event) -> Iterator[bytes]:
    """A fine-tune upload that stalls half-way until `release` is set."""
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
           "Content-Type: application/jsonl\r\n\r\n").encode()
    line = (json.dumps(chat_rows(1)[0]) + "\n").encode()
    yield line * 2000
    release.wait(60)
    yield line + f"\r\n--{boundary}--\r\n".encode()


def test_api_kill_9_mid_upload_leaves_no_row_and_staging_is_cleaned(stack: Stack) -> None:
    stack.extra_env.update({"TUNEHOUSE_STAGING_GRACE_SECONDS": "1", "TUNEHOUSE_CLEANUP_INTERVAL_SECONDS": "1"})
    api = stack.start_api()
    release, failures = threading.Event(), []

    def upload() -> None:
        boundary = "faultinjectionboundary"
        try:
            stack.request("POST", "/v1/files", content=_multipart_body(boundary, release), timeout=90,
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        except httpx.HTTPError as exc:
            failures.append(exc)

    sender = threading.Thread(target=upload)
    sender.start()
    try:
        partial = stack.wait(lambda: [p for p in stack.staging.glob("*") if p.stat().st_size > 0], 60,
                             "the upload to be half-way in staging", every=0.05)
        stack.kill9(api)
    finally:
        release.set()
        sender.join(60)
    assert failures, "the upload must not have succeeded"
    assert all(p.exists() for p in partial)  # the dead API left it behind
    stack.start_api()
    stack.wait(lambda: not any(stack.staging.glob("*")), 60, "the restarted API to clean staging")
    assert stack.try_json("/v1/files")["data"] == []
    with stack.sessions() as s:
        assert s.scalar(select(func.count()).select_from(File)) == 0
    assert stack.upload(write_jsonl(stack.tmp / "small.jsonl", chat_rows(8)))  # and uploads work again


def _db_errors(proc: Proc, offset: int) -> int:
    """Log records (one a line) about a failed database call since `offset`."""
    return sum(b"OperationalError" in line for line in proc.log.read_bytes()[offset:].splitlines())


def test_db_blip_during_progress_writes_loses_no_attempt(stack: Stack) -> None:
    stack.extra_env["TUNEHOUSE_LEASE_SECONDS"] = "20"
    stack.start_api()
    job_id = stack.create_job(_train_file(stack), checkpoint_every_steps=EVERY)
    worker = stack.start_worker()
    stack.wait_step(job_id, 2)  # training: an event per step, progress every 2 s
    seen = len(worker.log.read_bytes())
    stack.pg.stop("immediate")
    try:
        # Down until the worker logged three failed database calls (its heartbeat polls every
        # second; training writes an event every step).
        stack.wait(lambda: _db_errors(worker, seen) >= 3, 60, "the worker to hit the outage")
    finally:
        stack.pg.start()
    stack.wait_finished(job_id)
    job = stack.assert_consistent(job_id, EVERY, worker.tail())
    assert job["attempt"] == 1
    messages = [e.message for e in stack.events(job_id)]
    assert not any("Worker lost" in m for m in messages), messages
    assert sum(m.startswith("Fine-tuning job started") for m in messages) == 1
