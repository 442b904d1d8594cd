"""Short database outages while a job trains: the runner's progress, metric, event and checkpoint
writes are retried in a new session, so a blip costs a pause, not an attempt. The blips are real:
Postgres itself terminates the worker's connection (`pg_terminate_backend`) just before a write."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import event, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.jobs import runner
from app.jobs.lease import Heartbeat, claim
from app.kit.db import get_engine, make_engine, utcnow
from app.kit.dbretry import is_transient, retry_transient
from app.kit.storage import get_storage
from app.orm import Checkpoint, Job, JobEvent
from ml.checkpoint import CheckpointInfo
from ml.config import Task, TrainingKind
from tests.conftest import PG_URL, USING_PG
from tests.e2e.conftest import free_port
from tests.e2e.data import chat_rows
from tests.jobs.realdb import committed_clients, job_body, upload
from tests.jobs.worker_factories import committed_job

needs_pg = pytest.mark.skipif(not USING_PG, reason="terminates Postgres backends")
Match = Callable[[str, Any], bool]


@contextmanager
def connections_killed(match: Match, times: int) -> Iterator[list[int]]:
    """Terminates (and waits for the end of) the backend of the worker's connection right before each of
    the first `times` statements that `match`; yields the pids killed."""
    killed: list[int] = []
    admin = psycopg.connect(PG_URL.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)

    def before(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if len(killed) < times and match(statement, parameters):
            pid = cursor.connection.info.backend_pid
            assert admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone() == (True,)
            killed.append(pid)

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", before)
    try:
        yield killed
    finally:
        event.remove(engine, "before_cursor_execute", before)
        admin.close()


def _event_insert(kind: str) -> Match:
    return lambda sql, params: sql.startswith("INSERT INTO job_events") and isinstance(params, dict) \
        and params.get("type") == kind


def _job_update(sql: str, params: Any) -> bool:
    return sql.startswith("UPDATE jobs SET")


def _hook_write(sql: str, params: Any) -> bool:
    """Metric events, progress updates and checkpoint rows (not the claim, nor the heartbeat)."""
    return _event_insert("metrics")(sql, params) or sql.startswith(("UPDATE jobs SET progress=",
                                                                     "INSERT INTO checkpoints"))


@needs_pg
def test_each_hook_write_survives_a_dropped_connection(committed_db: sessionmaker[Session],
                                                       tmp_path: Path) -> None:
    job_id = committed_job(committed_db)
    got = claim(job_id, "w1")
    assert got is not None
    with committed_db() as s:
        job = s.get(Job, job_id)
        assert job is not None
    hooks = runner.JobHooks(got, Heartbeat(got), job, f"ft:tiny-lm:x::{job_id}", get_storage())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "weights.bin").write_bytes(b"w")
    info = CheckpointInfo(task=Task.causal_lm, training_type=TrainingKind.lora, base_model="tiny-lm", step=2,
                          epoch=0.5, metrics={"train_loss": 1.5})
    writes: list[tuple[Callable[[], None], Match]] = [
        (lambda: hooks.message("hello", data={"x": 1}), _event_insert("message")),
        (lambda: hooks.metrics(2, {"train_loss": 1.5}), _event_insert("metrics")),
        (lambda: hooks.progress(2, 10, 0.5, 100), _job_update),
        (lambda: hooks.checkpoint(ckpt, info), _job_update),
    ]
    for write, match in writes:
        with connections_killed(match, times=2) as killed:
            write()
        assert len(killed) == 2  # two real disconnects, each followed by a retry in a new session
    with committed_db() as s:
        job = s.get(Job, job_id)
        assert job is not None and (job.status, job.attempt, job.lease_owner) == ("running", 1, "w1")
        assert job.progress["step"] == 2
        rows = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))
        assert [e.message for e in rows] == ["hello", "Step 2: train_loss=1.5",
                                             "Checkpoint saved at step 2 (epoch 0.50)"]  # each once
        assert rows[1].data == {"step": 2, "train_loss": 1.5, "attempt": 1}
        assert s.scalar(select(Checkpoint.step).where(Checkpoint.job_id == job_id)) == 2


@needs_pg
@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_a_job_rides_out_blips_without_spending_an_attempt(committed_db: sessionmaker[Session]) -> None:
    """Six dropped connections during one real job (three more than max_attempts): it still succeeds
    on its first attempt, and its step history has every step once."""
    client = committed_clients(committed_db, "blips")[0]
    body = job_body(upload(client, chat_rows(40)), "causal_lm", "lora", 2e-2, checkpoint_every_steps=4)
    job_id = client.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    with connections_killed(_hook_write, times=6) as killed:
        assert runner.run_job(job_id, "w1") == "succeeded"
    assert len(killed) == 6
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert (job["status"], job["attempt"]) == ("succeeded", 1)
    csv_text = client.get(f"/v1/files/{job['result_files'][0]}/content").text
    steps = [int(r["step"]) for r in csv.DictReader(io.StringIO(csv_text))]
    assert steps == list(range(1, job["progress"]["total_steps"] + 1))


@needs_pg
def test_an_outage_longer_than_the_lease_slack_leaves_the_job_to_the_reaper(
        committed_db: sessionmaker[Session]) -> None:
    """Not the job's fault: it is not failed; its lease runs out and the reaper re-queues it."""
    job_id = committed_job(committed_db)
    got = claim(job_id, "w1")
    assert got is not None
    runner._fail(got, OperationalError("UPDATE jobs ...", {}, Exception("server closed the connection")))
    with committed_db() as s:
        job = s.get(Job, job_id)
        assert job is not None and (job.status, job.error) == ("running", None)
    runner._fail(got, RuntimeError("a real bug"))
    with committed_db() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "failed" and job.error["code"] == "internal_error"


def test_retry_gives_up_once_the_budget_is_spent() -> None:
    dead = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing")
    calls: list[int] = []

    def connect() -> None:
        calls.append(1)
        with dead.connect():
            pass

    with pytest.raises(OperationalError) as exc:
        retry_transient(connect, budget_s=0.3, what="test", first_delay_s=0.05)
    assert is_transient(exc.value) and len(calls) >= 2
    dead.dispose()


def test_statement_errors_are_not_retried(committed_db: sessionmaker[Session]) -> None:
    job_id = committed_job(committed_db)
    calls: list[int] = []

    def duplicate() -> None:
        calls.append(1)
        with committed_db.begin() as s:
            s.execute(update(Job).where(Job.id == job_id).values(started_at=utcnow()))
            s.add(JobEvent(id="evt-dup", job_id=job_id, message="a"))
            s.add(JobEvent(id="evt-dup", job_id=job_id, message="b"))

    with pytest.raises(IntegrityError) as exc:
        retry_transient(duplicate, budget_s=5, what="test")
    assert not is_transient(exc.value) and calls == [1]
