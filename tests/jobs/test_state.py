"""The job state machine: `transition` itself, and the user's cancel/pause racing the runner's
settling writes. Races are interleaved deterministically (the user's action commits in its own
session between the runner's steps, or inside the runner's transaction, waited on by condition)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.orm import Session, sessionmaker

from app.jobs import runner
from app.jobs.lease import Claim, claim
from app.jobs.service import cancel_job, pause_job
from app.jobs.state import ACTIVE, CLAIMABLE, TERMINAL, JobStatus, transition
from app.kit.db import get_engine, utcnow
from app.kit.errors import Conflict
from app.kit.storage import get_storage
from app.orm import File, FineTunedModel, Job, JobEvent, Project
from app.webhooks import service as webhooks
from app.webhooks.service import Delivery
from ml.checkpoint import CheckpointInfo
from ml.config import Interrupt, Task, TrainingKind, TrainOutcome
from tests.conftest import USING_PG
from tests.jobs.worker_factories import committed_job

HOOK = "https://example.com/hooks"


# --- plumbing -------------------------------------------------------------------------------------

@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Webhook event types handed to the broker (after commit)."""
    out: list[str] = []
    monkeypatch.setattr(webhooks, "send_delivery",
                        lambda d, countdown=None: out.append(_event_type(d)))
    return out


def _event_type(d: Delivery) -> str:
    match = re.search(r'"type":"fine_tuning\.job\.(\w+)"', d.body)
    assert match is not None
    return match.group(1)


@dataclass
class Running:
    job_id: str
    project: Project
    got: Claim


@pytest.fixture
def running(committed_db: sessionmaker[Session]) -> Running:
    job_id = committed_job(committed_db, webhook_url=HOOK)
    got = claim(job_id, "worker-1")
    assert got is not None
    with committed_db() as s:
        project = s.get(Project, s.get(Job, job_id).project_id)  # type: ignore[union-attr]
        assert project is not None
    return Running(job_id, project, got)


def _job(factory: sessionmaker[Session], job_id: str) -> Job:
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def _messages(factory: sessionmaker[Session], job_id: str) -> list[str]:
    with factory() as s:
        return list(s.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))


def _user(factory: sessionmaker[Session], action: Callable[[Session, Project, str], Job], r: Running) -> Job:
    """The user's request, committed in its own transaction (as the API does)."""
    with factory.begin() as s:
        return action(s, r.project, r.job_id)


@contextmanager
def user_acts_at_the_last_moment(factory: sessionmaker[Session], action: Callable[[Session, Project, str], Job],
                                 r: Running) -> Iterator[list[Job]]:
    """Commits the user's `action` in its own transaction just before the runner's status UPDATE runs:
    after every check the runner made in its transaction, so a check-then-act runner would overwrite it."""
    armed, done = [True], []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if armed and statement.startswith("UPDATE jobs SET") and " status=" in statement:
            armed.clear()
            done.append(_user(factory, action, r))

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", before)
    try:
        yield done
    finally:
        event.remove(engine, "before_cursor_execute", before)
    assert done, "the runner never wrote a status"


def _succeed(r: Running, tmp_path: Path) -> str:
    """The runner's last step, after training completed."""
    final = tmp_path / "final"
    final.mkdir(exist_ok=True)
    (final / "weights.bin").write_bytes(b"w")
    storage = get_storage()
    ft_name = f"ft:tiny-lm:{r.project.name}::{r.job_id}"
    info = CheckpointInfo(task=Task.causal_lm, training_type=TrainingKind.lora, base_model="tiny-lm", step=3,
                          epoch=1.0)
    outcome = TrainOutcome(completed=True, step=3, trained_tokens=123)
    return runner._succeed(r.got, storage, final, info, outcome, ft_name)


def _nothing_of_success(factory: sessionmaker[Session], r: Running) -> None:
    with factory() as s:
        assert s.scalar(select(FineTunedModel).where(FineTunedModel.job_id == r.job_id)) is None
        assert s.scalar(select(File).where(File.project_id == r.project.id,
                                           File.purpose == "fine-tune-results")) is None
    assert not any("successfully completed" in m for m in _messages(factory, r.job_id))


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# --- transition -----------------------------------------------------------------------------------

def test_status_names_equal_values_so_plain_strings_find_members() -> None:
    assert all(s.name == s.value for s in JobStatus)
    assert "running" in ACTIVE and "succeeded" in TERMINAL and "queued" in CLAIMABLE
    assert set(JobStatus) == ACTIVE | TERMINAL and not ACTIVE & TERMINAL


def test_transition_respects_the_from_set(committed_db: sessionmaker[Session]) -> None:
    job_id = committed_job(committed_db)  # queued
    with committed_db.begin() as s:
        assert not transition(s, job_id, to=JobStatus.cancelled, from_={JobStatus.running})
    assert _job(committed_db, job_id).status == JobStatus.queued
    with committed_db.begin() as s:
        assert transition(s, job_id, to=JobStatus.cancelled, from_=ACTIVE)
    job = _job(committed_db, job_id)
    assert job.status == JobStatus.cancelled and job.finished_at is not None  # terminal: stamped


def test_transition_respects_the_lease_owner(committed_db: sessionmaker[Session]) -> None:
    job_id = committed_job(committed_db, status=JobStatus.running, lease_owner="w1", lease_expires_at=utcnow())
    with committed_db.begin() as s:
        assert not transition(s, job_id, to=JobStatus.failed, from_={JobStatus.running}, owner="w2")
        assert transition(s, job_id, to=None, from_={JobStatus.running}, owner="w1", heartbeat_at=utcnow())
    assert _job(committed_db, job_id).status == JobStatus.running  # to=None keeps the status
    with committed_db.begin() as s:
        assert transition(s, job_id, to=JobStatus.failed, from_={JobStatus.running}, owner="w1")
    job = _job(committed_db, job_id)
    assert (job.status, job.lease_owner, job.lease_expires_at) == (JobStatus.failed, None, None)


def test_transition_refreshes_the_sessions_object(committed_db: sessionmaker[Session]) -> None:
    job_id = committed_job(committed_db)
    with committed_db.begin() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert transition(s, job_id, to=JobStatus.paused, from_=CLAIMABLE)
        assert job.status == JobStatus.paused


@pytest.mark.parametrize(("to", "from_", "values"), [
    (JobStatus.succeeded, {JobStatus.queued}, {}),  # no such edge: only a running job succeeds
    (JobStatus.queued, {JobStatus.cancelled}, {}),  # terminal is terminal
    (JobStatus.cancelled, set(), {}),  # no from-set
    (None, {JobStatus.running}, {}),  # nothing to write
])
def test_transition_rejects_bad_calls(to: JobStatus | None, from_: set[JobStatus], values: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        transition(None, "ftjob-x", to=to, from_=from_, **values)  # type: ignore[arg-type]


# --- cancel racing a finish -------------------------------------------------------------------------

def test_cancel_racing_the_finish_wins(committed_db: sessionmaker[Session], running: Running,
                                       sent: list[str], tmp_path: Path) -> None:
    with user_acts_at_the_last_moment(committed_db, cancel_job, running):
        assert _succeed(running, tmp_path) == "lease_lost"
    job = _job(committed_db, running.job_id)
    assert job.status == JobStatus.cancelled and job.fine_tuned_model is None and job.result_files == []
    _nothing_of_success(committed_db, running)
    assert sent == ["cancelled"]


def test_cancel_after_the_finish_is_rejected(committed_db: sessionmaker[Session], running: Running,
                                             sent: list[str], tmp_path: Path) -> None:
    assert _succeed(running, tmp_path) == JobStatus.succeeded
    with pytest.raises(Conflict) as exc:
        _user(committed_db, cancel_job, running)
    assert exc.value.code == "job_not_cancellable"
    job = _job(committed_db, running.job_id)
    assert job.status == JobStatus.succeeded and job.fine_tuned_model is not None
    assert sent == ["succeeded"]


@pytest.mark.skipif(not USING_PG, reason="row locks: Postgres")
@pytest.mark.parametrize(("action", "refusal"), [(cancel_job, "job_not_cancellable"), (pause_job, "job_not_pausable")])
def test_user_action_during_the_settling_transaction_waits_and_is_rejected(
        committed_db: sessionmaker[Session], running: Running, sent: list[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, action: Callable[[Session, Project, str], Job], refusal: str) -> None:
    """The request arrives after the runner's status update, before its commit: it waits on the row
    lock, then finds the job succeeded and answers 409. (Without the lock it would commit at once,
    and the runner would then overwrite it.)"""
    answers: list[str] = []

    def request() -> None:
        try:
            _user(committed_db, action, running)
            answers.append("accepted")
        except Conflict as exc:
            answers.append(str(exc.code))

    user = threading.Thread(target=request)
    store = runner._store_result_file

    def store_while_the_user_acts(*args: Any) -> str:
        user.start()
        wait_for(lambda: not user.is_alive() or _lock_waiters(committed_db) > 0, "the request to block or end")
        return store(*args)

    monkeypatch.setattr(runner, "_store_result_file", store_while_the_user_acts)
    assert _succeed(running, tmp_path) == JobStatus.succeeded
    user.join(timeout=10)
    assert answers == [refusal]
    job = _job(committed_db, running.job_id)
    assert job.status == JobStatus.succeeded and not job.pause_requested
    assert sent == ["succeeded"]


def _lock_waiters(factory: sessionmaker[Session]) -> int:
    with factory() as s:
        return int(s.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                 "AND wait_event_type = 'Lock'")) or 0)


def test_fail_after_a_cancel_keeps_it_cancelled(committed_db: sessionmaker[Session], running: Running,
                                                sent: list[str]) -> None:
    with user_acts_at_the_last_moment(committed_db, cancel_job, running):
        runner._fail(running.got, RuntimeError("CUDA error"))
    job = _job(committed_db, running.job_id)
    assert job.status == JobStatus.cancelled and job.error is None
    assert not any(m.startswith("Job failed") for m in _messages(committed_db, running.job_id))
    assert sent == ["cancelled"]


# --- pause racing a finish --------------------------------------------------------------------------

def test_pause_requested_too_late_is_answered_not_lost(committed_db: sessionmaker[Session], running: Running,
                                                       sent: list[str], tmp_path: Path) -> None:
    """Training completed before the worker saw the request: the job succeeds, the request is
    cleared with a warning event; a pause after the finish is rejected."""
    with user_acts_at_the_last_moment(committed_db, pause_job, running) as paused:
        assert _succeed(running, tmp_path) == JobStatus.succeeded
    assert paused[0].pause_requested  # accepted (200); answered below, not dropped
    job = _job(committed_db, running.job_id)
    assert job.status == JobStatus.succeeded and not job.pause_requested
    assert any("Pause request came too late" in m for m in _messages(committed_db, running.job_id))
    with pytest.raises(Conflict) as exc:
        _user(committed_db, pause_job, running)
    assert exc.value.code == "job_not_pausable"
    assert sent == ["succeeded"]


def test_pause_seen_in_time_is_honoured(committed_db: sessionmaker[Session], running: Running,
                                        sent: list[str]) -> None:
    _user(committed_db, pause_job, running)
    stopped = TrainOutcome(completed=False, interrupt=Interrupt.paused, step=2)
    assert runner._interrupted(running.got, stopped) == Interrupt.paused
    job = _job(committed_db, running.job_id)
    assert (job.status, job.pause_requested, job.lease_owner, job.attempt) == (JobStatus.paused, False, None, 0)
    assert sent == []


def test_cancel_beats_a_pause_the_worker_is_settling(committed_db: sessionmaker[Session], running: Running,
                                                     sent: list[str]) -> None:
    _user(committed_db, pause_job, running)
    stopped = TrainOutcome(completed=False, interrupt=Interrupt.paused, step=2)
    with user_acts_at_the_last_moment(committed_db, cancel_job, running):
        assert runner._interrupted(running.got, stopped) == Interrupt.lease_lost
    assert _job(committed_db, running.job_id).status == JobStatus.cancelled
    assert not any("Job paused" in m for m in _messages(committed_db, running.job_id))
    assert sent == ["cancelled"]

