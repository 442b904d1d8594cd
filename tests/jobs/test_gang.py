"""Multi-node jobs (`resources.nodes = 2`, `app.jobs.gang`): two worker processes on this machine act as
two nodes (one gloo process each) and run one job to success through their claim tokens (`run_next`),
the leader writing the job's state; a gang whose follower never comes gives the job back to the queue
without spending an attempt."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.jobs import reaper
from app.jobs.gang import open_gang, take_seat, wait_for_followers
from app.jobs.lease import Heartbeat, claim
from app.jobs.runner import run_next
from app.kit.db import utcnow
from app.orm import GangSeat, Job
from app.settings import get_settings
from tests.conftest import USING_REDIS
from tests.jobs.realdb import (
    committed_clients,
    create_group_job,
    events_oldest_first,
    kill_rank_one_after_first_checkpoint,
)
from tests.jobs.worker_factories import committed_job

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread", "empty_training_queue"),
              pytest.mark.skipif(not USING_REDIS, reason="embedded mode (no Redis) refuses nodes > 1")]
ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 300


@pytest.fixture
def client(committed_db: sessionmaker[Session]) -> TestClient:
    return committed_clients(committed_db, "gangs")[0]


def _create(client: TestClient, **extra: Any) -> str:
    return create_group_job(client, {"devices": 1, "nodes": 2, "strategy": "ddp"}, **extra)


def _events(client: TestClient, job_id: str) -> list[dict[str, Any]]:
    return events_oldest_first(client, job_id)


def _seats(factory: sessionmaker[Session], job_id: str) -> int:
    with factory() as s:
        return int(s.scalar(select(func.count()).select_from(GangSeat).where(GangSeat.job_id == job_id)) or 0)


class Worker:
    """A worker process that handles one claim token (`run_next`), as a Celery worker would."""

    def __init__(self, worker_id: str, log: Path) -> None:
        code = f"from app.jobs.runner import run_next; print('RESULT', run_next({worker_id!r}), flush=True)"
        env = os.environ | {"TUNEHOUSE_WORKER_ADDRESS": "127.0.0.1", "TUNEHOUSE_TORCH_THREADS": "1",
                            "TUNEHOUSE_HEARTBEAT_SECONDS": "1", "TUNEHOUSE_LEASE_SECONDS": "20"}
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT)

    def result(self, deadline: float) -> str:
        try:
            self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        text = self.log.read_text(errors="replace")
        results = [line.split(" ", 1)[1] for line in text.splitlines() if line.startswith("RESULT ")]
        assert results, text[-4000:]
        return results[-1]


def test_two_workers_run_a_two_node_job(client: TestClient, committed_db: sessionmaker[Session],
                                        tmp_path: Path) -> None:
    job_id = _create(client, hyperparameters={"n_epochs": 1, "batch_size": 8})
    deadline = time.monotonic() + DEADLINE_S
    leader, follower = _start_gang(client, committed_db, tmp_path, job_id, deadline)
    assert leader.result(deadline) == "succeeded", leader.log.read_text()[-4000:]
    assert follower.result(deadline) == "follower_done", follower.log.read_text()[-4000:]

    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["trained_tokens"] > 0
    assert job["resources"] == {"devices": 1, "nodes": 2, "strategy": "ddp"}
    events = _events(client, job_id)
    started = next(e for e in events if e["message"].startswith("Fine-tuning job started"))
    assert "on 2 nodes" in started["message"]
    assert started["data"]["nodes"] == 2 and started["data"]["world_size"] == 2
    (announce,) = [e for e in events if "data parallel over 2 processes" in e["message"]]
    assert announce["data"]["world_size"] == 2 and announce["data"]["backend"] == "gloo"
    assert client.get(f"/v1/models/{job['fine_tuned_model']}").status_code == 200
    assert _seats(committed_db, job_id) == 0  # closed with the attempt
    with committed_db() as s:
        assert s.scalar(select(Job.attempt).where(Job.id == job_id)) == 1


def _start_gang(client: TestClient, committed_db: sessionmaker[Session], tmp_path: Path, job_id: str,
                deadline: float) -> tuple[Worker, Worker]:
    leader = Worker("node-a", tmp_path / "a.log")
    while _seats(committed_db, job_id) == 0:  # the leader claimed the job and opened its gang
        assert leader.proc.poll() is None and time.monotonic() < deadline, leader.log.read_text()[-4000:]
        time.sleep(0.2)
    return leader, Worker("node-b", tmp_path / "b.log")


def test_a_lost_node_requeues_the_attempt(client: TestClient, committed_db: sessionmaker[Session],
                                          tmp_path: Path) -> None:
    job_id = _create(client, checkpoint_every_steps=1, hyperparameters={"n_epochs": 6, "batch_size": 4})
    deadline = time.monotonic() + DEADLINE_S
    leader, follower = _start_gang(client, committed_db, tmp_path, job_id, deadline)
    kill_rank_one_after_first_checkpoint(committed_db, job_id, deadline)  # node b, as if its machine went away
    assert leader.result(deadline) == "queued", leader.log.read_text()[-4000:]
    assert follower.result(deadline) == "follower_failed", follower.log.read_text()[-4000:]
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "queued" and job["attempt"] == 1  # a lost node spends the attempt
    assert any("Training group lost on attempt 1" in e["message"] for e in _events(client, job_id))
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]  # the next resumes there
    assert _seats(committed_db, job_id) == 0


def test_a_gang_without_its_follower_gives_the_job_back(client: TestClient, committed_db: sessionmaker[Session],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "gang_timeout_seconds", 1.0)
    job_id = _create(client)
    assert run_next("lonely-leader") == "dissolved"

    with committed_db() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert (job.status, job.attempt, job.lease_owner) == ("queued", 0, None)
    assert _seats(committed_db, job_id) == 0
    assert take_seat("late-follower") is None  # nothing left to join
    (gone,) = [e for e in _events(client, job_id) if "Gang dissolved" in e["message"]]
    assert gone["level"] == "warn" and gone["data"] == {"nodes": 2, "joined": 1}
    assert not [e for e in _events(client, job_id) if e["message"].startswith("Fine-tuning job started")]


def _leader(factory: sessionmaker[Session], seconds: int, devices: int = 1, nodes: int = 2) -> Any:
    at = utcnow() - timedelta(hours=1, seconds=-seconds)
    job_id = committed_job(factory, project_name="gang-seats", created_at=at, devices=devices, nodes=nodes)
    got = claim(job_id, f"leader-{seconds}")
    assert got is not None
    return open_gang(got, nodes, devices, resume_key=None)


NO_INTERRUPT = cast(Heartbeat, SimpleNamespace(interrupt=None))


def test_seats_fit_the_follower_and_an_older_gang_goes_first(committed_db: sessionmaker[Session],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "worker_devices", 2)
    older, newer = _leader(committed_db, 0, devices=2), _leader(committed_db, 1, devices=1, nodes=3)
    assert older.rendezvous.port > 0 and older.rendezvous.run_id == f"{older.claim.job_id}-1"
    # Two leaders waiting for each other's followers: the newer gives way, the oldest never does.
    assert wait_for_followers(newer, NO_INTERRUPT, timeout_s=5) == "yield"
    assert wait_for_followers(older, NO_INTERRUPT, timeout_s=0.1) == "timeout"

    assert take_seat("one-device-follower", devices=1) is not None  # the newer gang's (1 device a node)
    seat = take_seat("two-device-follower", devices=2)  # the oldest open gang first
    assert seat is not None and (seat.job_id, seat.rendezvous.node_rank) == (older.claim.job_id, 1)
    assert (seat.rendezvous.nodes, seat.rendezvous.devices, seat.rendezvous.world_size) == (2, 2, 4)
    assert seat.rendezvous.endpoint == older.rendezvous.endpoint
    assert take_seat("another", devices=2) is not None  # newer's last seat
    assert take_seat("and-another", devices=2) is None
    assert wait_for_followers(older, NO_INTERRUPT, timeout_s=5) == "formed"

    # A joined follower that stopped heartbeating gives its seat back to the next worker.
    with committed_db.begin() as s:
        s.execute(update(GangSeat).where(GangSeat.job_id == newer.claim.job_id).values(
            heartbeat_at=utcnow() - timedelta(hours=1)))
    assert wait_for_followers(newer, NO_INTERRUPT, timeout_s=0.1) == "timeout"
    assert take_seat("fresh-follower", devices=1) is not None

    # Seats of an attempt that is over (its leader died, the job was re-queued) are swept by the reaper.
    with committed_db.begin() as s:
        s.execute(update(Job).where(Job.id == newer.claim.job_id).values(status="queued", lease_owner=None))
    reaper.reap_once()
    assert _seats(committed_db, newer.claim.job_id) == 0 and _seats(committed_db, older.claim.job_id) == 1
