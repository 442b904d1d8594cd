"""Throwaway services for fault-injection tests: a private `redis-server` and a private Postgres
cluster the tests may kill -9 and restart without touching the shared ones, plus a `Stack` (API and
Celery workers pointed at them) and the invariants every fault test checks afterwards."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from app.auth.service import create_api_key, get_or_create_project
from app.kit.db import make_engine
from app.kit.migrate import upgrade_head
from app.orm import Checkpoint, FineTunedModel, Job, JobEvent
from tests.e2e.conftest import Proc, free_port, service_env, wait_for, wait_http

DONE_MESSAGE = "The job has successfully completed"
TERMINAL = ("succeeded", "failed", "cancelled")


def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    if found:
        return str(found[-1])  # the newest installed major version
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found (install postgresql)")
    return path


def missing_binaries() -> list[str]:
    """What the throwaway services need and this machine lacks (scripts/test.sh installs them)."""
    missing = [] if shutil.which("redis-server") else ["redis-server"]
    for name in ("initdb", "pg_ctl"):
        try:
            _pg_bin(name)
        except FileNotFoundError:
            missing.append(name)
    if os.geteuid() == 0 and not shutil.which("runuser"):
        missing.append("runuser")
    return missing


class ThrowawayRedis:
    """`redis-server` on a free port with no persistence: a restart comes back empty."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "no", "--daemonize", "no"]
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.ping, 20, "redis-server to answer", every=0.05)

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart_empty(self) -> None:
        self.kill9()
        self.start()


class ThrowawayPostgres:
    """A private cluster (initdb once) on a free port; stop -m immediate is a crash, start recovers.
    Postgres refuses to run as root, so as root the cluster belongs to the `postgres` OS user."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.data, self.log = root / "data", root / "postgres.log"
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(root, pw.pw_uid, pw.pw_gid)
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync",
                  "-E", "UTF8")
        self.admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str) -> None:
        full = ["runuser", "-u", self.user, "--", *cmd] if self.user else list(cmd)
        out = subprocess.run(full, cwd=self.root, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {out.stdout}{out.stderr}")

    def start(self) -> None:
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off "
                "-c full_page_writes=off -c max_connections=200")
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60",
                  "start")

    def stop(self, mode: str = "immediate") -> None:
        """`immediate` is a crash (no shutdown checkpoint): the next start runs recovery."""
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self) -> None:
        self.stop("immediate")
        self.start()

    def create_database(self, name: str) -> str:
        """A fresh database at the head migration; returns its SQLAlchemy URL."""
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"
        upgrade_head(url)
        return url

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # already down
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def make_postgres() -> ThrowawayPostgres:
    pg = ThrowawayPostgres(Path(tempfile.mkdtemp(prefix="tunehouse-faults-pg-")))
    pg.start()
    return pg


# --- the service stack ------------------------------------------------------------------------

@dataclass
class Stack:
    """The API (with its reaper) and Celery workers on the throwaway Postgres and Redis; artifacts in
    this test's own directory, so the staging area holds only this test's files."""

    pg: ThrowawayPostgres
    redis: ThrowawayRedis
    db_url: str
    tmp: Path
    starter: Callable[..., Proc]  # the e2e `start_worker` fixture
    extra_env: dict[str, str] = field(default_factory=dict)
    api: Proc | None = None
    procs: list[Proc] = field(default_factory=list)
    key: str = ""
    port: int = 0
    killed: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.engine = make_engine(self.db_url)
        self.sessions = sessionmaker(bind=self.engine, expire_on_commit=False)
        with self.sessions() as s:
            self.key = create_api_key(s, get_or_create_project(s, "faults"), "faults")
            s.commit()
        self.port = free_port()

    @property
    def env(self) -> dict[str, str]:
        return {"TUNEHOUSE_DATABASE_URL": self.db_url, "TUNEHOUSE_BROKER_URL": self.redis.url,
                "TUNEHOUSE_ARTIFACT_URL": str(self.artifacts), "TUNEHOUSE_TORCH_THREADS": "1",
                "OMP_NUM_THREADS": "1", **self.extra_env}

    @property
    def artifacts(self) -> Path:
        return self.tmp / "artifacts"

    @property
    def staging(self) -> Path:
        return self.artifacts / ".staging"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_api(self) -> Proc:
        cmd = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning"]
        self.api = Proc(cmd, service_env(**self.env), self.tmp / f"api{len(self.procs)}.log")
        self.procs.append(self.api)
        wait_http(f"{self.base}/healthz", timeout=90)
        return self.api

    def start_worker(self) -> Proc:
        """Through the e2e `start_worker` fixture, with this stack's environment."""
        proc = self.starter(**self.env)
        self.procs.append(proc)
        return proc

    def runner_of(self, job_id: str) -> Proc:
        """The worker process holding the job's lease (its owner id names the pid)."""
        with self.sessions() as s:
            owner = s.scalar(select(Job.lease_owner).where(Job.id == job_id)) or ""
        found = [p for p in self.procs if str(p.p.pid) in owner.split(":")]
        assert len(found) == 1, (owner, [p.p.pid for p in self.procs])
        return found[0]

    def kill9(self, proc: Proc) -> None:
        self.killed.append(proc)
        proc.kill9()

    def check_alive(self) -> None:
        """Fail a wait at once, with its log, when a process died that no test killed."""
        for p in self.procs:
            if p not in self.killed and p.p.poll() is not None:
                raise RuntimeError(f"{p.log.name} exited with {p.p.returncode}:\n{p.tail()}")

    def wait(self, fn: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
        def check() -> Any:
            self.check_alive()
            return fn()
        return wait_for(check, timeout, what, every)

    def stop(self) -> None:
        """Everything here is throwaway: kill -9 is the quick way down."""
        for p in self.procs:
            p.kill9()
            p.stop()  # closes the log
        self.engine.dispose()

    # --- HTTP -----------------------------------------------------------------------------

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}", **kw.pop("headers", {})}
        return httpx.request(method, f"{self.base}{path}", headers=headers, timeout=kw.pop("timeout", 30), **kw)

    def try_json(self, path: str) -> Any:
        """The body of a successful GET, or None while the API or its database is down."""
        try:
            r = self.request("GET", path, timeout=5)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def upload(self, path: Path) -> str:
        with open(path, "rb") as fh:
            r = self.request("POST", "/v1/files", files={"file": (path.name, fh)}, data={"purpose": "fine-tune"})
        assert r.status_code == 200, r.text
        return str(r.json()["id"])

    def create_job(self, file_id: str, **extra: Any) -> str:
        body = {"model": "tiny-lm", "training_file": file_id, "seed": 3,
                "hyperparameters": {"n_epochs": 6, "batch_size": 4},
                "training_type": {"type": "lora", "lora_r": 4}, "max_seq_length": 64, **extra}
        r = self.request("POST", "/v1/fine_tuning/jobs", json=body)
        assert r.status_code == 200, r.text
        return str(r.json()["id"])

    def job(self, job_id: str) -> Any:
        return self.try_json(f"/v1/fine_tuning/jobs/{job_id}")

    def wait_step(self, job_id: str, step: int, timeout: float = 180) -> Any:
        return self.wait(lambda: (j := self.job(job_id)) and (j["status"] in TERMINAL or
                                                              (j.get("progress") or {}).get("step", 0) >= step) and j,
                         timeout, f"job {job_id} to reach step {step}")

    def wait_finished(self, job_id: str, timeout: float = 240) -> Any:
        return self.wait(lambda: (j := self.job(job_id)) and j["status"] in TERMINAL and j, timeout,
                         f"job {job_id} to finish")

    def checkpoint_steps(self, job_id: str) -> list[int]:
        with self.sessions() as s:
            return sorted(s.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job_id)))

    def wait_checkpoint(self, job_id: str, timeout: float = 180) -> int:
        return int(self.wait(lambda: self.checkpoint_steps(job_id), timeout, "a first checkpoint", every=0.1)[0])

    # --- the invariants -------------------------------------------------------------------

    def events(self, job_id: str) -> list[JobEvent]:
        with self.sessions() as s:
            return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                                  .order_by(JobEvent.seq)))

    def assert_consistent(self, job_id: str, every: int, logs: str = "") -> dict[str, Any]:
        """Finished exactly once; checkpoints exactly as scheduled, none lost or duplicated, each with
        its weights and no orphan weights; the result CSV has every step once."""
        job = self.job(job_id)
        assert job is not None and job["status"] == "succeeded", (job, logs)
        total = job["progress"]["total_steps"]
        assert job["progress"]["step"] == total
        messages = [e.message for e in self.events(job_id)]
        assert messages.count(DONE_MESSAGE) == 1, messages
        with self.sessions() as s:
            models = list(s.scalars(select(FineTunedModel).where(FineTunedModel.job_id == job_id)))
            rows = list(s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)))
            row = s.get(Job, job_id)
            assert row is not None
        assert len(models) == 1 and models[0].id == job["fine_tuned_model"]
        finals = {p.name for p in (self.artifacts / "jobs" / job_id).glob("final-*")}
        assert finals == {models[0].storage_key.rsplit("/", 1)[1]}, finals
        steps = sorted(c.step for c in rows)
        expected = sorted({*range(every, total + 1, every), total})
        assert steps == expected, (steps, expected)
        ckpt_dir = self.artifacts / "jobs" / job_id / "checkpoints"
        on_disk = {p.name for p in ckpt_dir.iterdir() if not p.name.startswith(".")}  # not half-written ones
        assert on_disk == {c.storage_key.rsplit("/", 1)[1] for c in rows}, on_disk
        assert sum(c.is_best for c in rows) == 1
        assert len(job["result_files"]) == 1
        r = self.request("GET", f"/v1/files/{job['result_files'][0]}/content")
        assert r.status_code == 200, r.text
        history = list(csv.DictReader(io.StringIO(r.text)))  # no validation file: one row per step
        csv_steps = [int(h["step"]) for h in history]
        assert csv_steps == list(range(1, total + 1)), f"result CSV steps: {csv_steps}"
        assert all(h["train_loss"] for h in history), r.text[:2000]
        return dict(job, attempt=row.attempt)
