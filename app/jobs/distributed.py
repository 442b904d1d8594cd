"""An attempt on several devices (`resources.devices > 1`): the worker starts
`torchrun --standalone --nproc_per_node N -m ml.training.launch SPEC` (a gang's node, `app.jobs.gang`:
`--nnodes M --node_rank r` with node 0's rendezvous) and stays the job's only link
to the database. It keeps the lease and heartbeat, applies rank 0's hook calls (JSON lines in
`events.jsonl`) through the ordinary `JobHooks`, and passes cancel / pause / a lost lease to the group
by writing `control`. A rank that dies takes the group down (torchrun); the attempt is then re-queued
like a lost worker, to resume from its last checkpoint under any world size."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy.orm import Session

from app.jobs.events import add_event
from app.jobs.gang import Gang, Rendezvous, Seat, SeatHeartbeat, stale_followers
from app.jobs.lease import Claim, Heartbeat
from app.jobs.state import JobStatus, transition
from app.kit.db import utcnow
from app.kit.dbretry import write_with_retry
from app.models_registry.catalog import local_base
from app.orm import Job
from app.settings import get_settings
from app.webhooks.service import notify_terminal
from ml.config import Interrupt, RecipeConfig, TrainOutcome
from ml.errors import InputError

log = logging.getLogger(__name__)
POLL_S = 0.2  # how often the worker reads the group's events and checks for an interrupt
LOG_TAIL = 2000  # characters of the group's output kept in the error message
FOLLOWER_GRACE_S = 30.0  # a follower's group may outlive the leader's attempt this long before it is killed


class GroupDied(RuntimeError):
    """A training process exited without an outcome (killed, out of memory, a crash)."""


@dataclass
class GroupResult:
    outcome: TrainOutcome
    final: Path | None  # the consolidated weights of a completed run
    report: dict[str, Any] | None


@dataclass
class Inputs:
    train_path: Path
    valid_path: Path | None
    resume_dir: Path | None
    init_dir: Path | None
    validation_file: str | None


class Channel:
    """The worker's end of the files shared with rank 0."""

    def __init__(self, workdir: Path) -> None:
        self.events, self.control = workdir / "events.jsonl", workdir / "control"
        self.events.touch()
        self._offset = 0
        self._sent: Interrupt | None = None

    def lines(self) -> list[dict[str, Any]]:
        """Complete lines written since the last call (a line being written waits for the next)."""
        with self.events.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]

    def signal(self, why: Interrupt | None) -> None:
        if why is None or self._sent is not None:
            return
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(why.value)
        tmp.replace(self.control)  # rank 0 never reads half a word
        self._sent = why


def group_command(devices: int, spec_path: Path, rdzv: Rendezvous | None = None) -> list[str]:
    """One machine: `--standalone`. A gang's node: torchrun's static rendezvous, so node r's ranks are
    r*devices.. and rank 0 (the one that reports) is always on the leader, which hosts the store."""
    if rdzv is None:
        where = ["--standalone"]
    else:
        where = [f"--nnodes={rdzv.nodes}", f"--node_rank={rdzv.node_rank}", "--rdzv_backend=static",
                 f"--rdzv_id={rdzv.run_id}", f"--master_addr={rdzv.host}", f"--master_port={rdzv.port}",
                 "--max_restarts=0"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={devices}",
            "-m", "ml.training.launch", str(spec_path)]


def write_spec(cfg: RecipeConfig, workdir: Path, inputs: Inputs, threads: int) -> Path:
    from ml.training.launch import LaunchSpec

    def opt(p: Path | None) -> str | None:
        return str(p) if p is not None else None

    base = local_base(cfg.base_model)
    spec = LaunchSpec(
        config=cfg, base=base.spec, base_path=str(base.path), workdir=str(workdir),
        train_path=str(inputs.train_path), valid_path=opt(inputs.valid_path), resume_dir=opt(inputs.resume_dir),
        init_dir=opt(inputs.init_dir), device=get_settings().device, threads=threads,
        events=str(workdir / "events.jsonl"), control=str(workdir / "control"),
        validation_file=inputs.validation_file,
    )
    path = workdir / "launch.json"
    path.write_text(spec.model_dump_json())
    return path


def _start(cfg: RecipeConfig, workdir: Path, inputs: Inputs, threads: int, rdzv: Rendezvous | None,
           out: IO[bytes]) -> subprocess.Popen[bytes]:
    devices = cfg.resources.devices
    threads_each = max(1, threads // devices)
    spec_path = write_spec(cfg, workdir, inputs, threads_each)
    env = os.environ | {"OMP_NUM_THREADS": str(threads_each)}
    # its own process group: the worker can take torchrun and every rank down together
    return subprocess.Popen(group_command(devices, spec_path, rdzv), stdout=out, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_group(cfg: RecipeConfig, hooks: Any, hb: Heartbeat, workdir: Path, inputs: Inputs,
              threads: int, gang: Gang | None = None) -> GroupResult:
    """Runs the group to its end, relaying its hook calls; the outcome as `recipe.train()` would give it.
    A gang's leader also watches its followers' heartbeats: a node lost without a word (a machine gone)
    could leave the collectives here waiting for an hour."""
    channel = Channel(workdir)
    log_path = workdir / "group.log"
    result: dict[str, Any] = {}
    lost: list[int] = []
    with log_path.open("wb") as out:
        proc = _start(cfg, workdir, inputs, threads, gang.rendezvous if gang else None, out)
        last_watch = time.monotonic()
        try:
            while proc.poll() is None:
                _relay(channel.lines(), hooks, result)
                channel.signal(hb.interrupt)
                if gang is not None and time.monotonic() - last_watch >= get_settings().heartbeat_seconds:
                    last_watch = time.monotonic()
                    lost = _lost_followers(gang)
                    if lost:
                        break
                time.sleep(POLL_S)
        finally:
            _kill(proc)  # the worker itself is going down, or a node was lost: take the group with it
    _relay(channel.lines(), hooks, result)
    if lost and "outcome" not in result:
        raise GroupDied(f"node(s) {', '.join(map(str, lost))} stopped responding")
    return _result(result, proc.returncode, workdir, log_path)


def _lost_followers(gang: Gang) -> list[int]:
    try:
        return stale_followers(gang)
    except Exception:  # a DB blip is not a lost node
        log.exception("could not read the gang's heartbeats")
        return []


def run_follower(cfg: RecipeConfig, seat: Seat, hb: SeatHeartbeat, workdir: Path, inputs: Inputs,
                 threads: int) -> int:
    """A follower's node of a gang: its ranks report nothing (rank 0 is on the leader); it runs until
    torchrun exits, or is taken down once the leader's attempt is over (grace: the leader's ranks end
    first on a normal finish, and a group that lost its peer fails on its own). Returns torchrun's code."""
    log_path = workdir / "group.log"
    Channel(workdir)  # the spec names these files; only rank 0 would use them
    with log_path.open("wb") as out:
        proc = _start(cfg, workdir, inputs, threads, seat.rendezvous, out)
        ended_at: float | None = None
        try:
            while proc.poll() is None:
                if hb.ended.is_set() and ended_at is None:
                    ended_at = time.monotonic()
                if ended_at is not None and time.monotonic() - ended_at > FOLLOWER_GRACE_S:
                    log.warning("the leader's attempt is over; stopping this node", extra={"job_id": seat.job_id})
                    break
                time.sleep(POLL_S)
        finally:
            _kill(proc)
    if proc.returncode:
        log.error("gang node %d exited with %s:\n%s", seat.rendezvous.node_rank, proc.returncode,
                  log_path.read_bytes()[-LOG_TAIL:].decode(errors="replace"))
    return int(proc.returncode)


def _relay(lines: list[dict[str, Any]], hooks: Any, result: dict[str, Any]) -> None:
    from ml.checkpoint import read_info

    for line in lines:
        kind = line.pop("kind")
        if kind == "message":
            hooks.message(line["text"], level=line["level"], data=line["data"])
        elif kind == "metrics":
            hooks.metrics(line["step"], line["values"])
        elif kind == "progress":
            hooks.progress(line["step"], line["total_steps"], line["epoch"], line["trained_tokens"])
        elif kind == "checkpoint":
            local = Path(line["dir"])
            hooks.checkpoint(local, read_info(local))
        else:  # outcome / error: the last line
            result[kind] = line


def _result(result: dict[str, Any], rc: int, workdir: Path, log_path: Path) -> GroupResult:
    from ml.training.launch import FINAL_DIR

    err = result.get("error")
    if err is not None and not err.get("internal"):
        raise InputError(err["message"], param=err["param"], code=err["code"])
    if "outcome" not in result:
        # A crash, a killed rank (rank 0 then sees its peer's collective fail) or out of memory: the
        # attempt is retried from its last checkpoint, up to max_attempts.
        tail = log_path.read_bytes()[-LOG_TAIL:].decode(errors="replace")
        log.error("training group exited with %s:\n%s", rc, tail)
        why = f": {err['message']}" if err is not None else ""
        raise GroupDied(f"a training process exited with code {rc}{why}"[:1000])
    data = dict(result["outcome"]["outcome"])
    data["interrupt"] = Interrupt(data["interrupt"]) if data["interrupt"] else None
    outcome = TrainOutcome(**data)
    final = workdir / FINAL_DIR if outcome.completed else None
    return GroupResult(outcome, final, result["outcome"]["report"])


def requeue(got: Claim, why: str) -> str:
    """Like a lost worker (`app.jobs.reaper`): queued again to resume from the last checkpoint, or
    failed once `max_attempts` are spent. Conditional on still holding the lease."""
    settings = get_settings()
    budget = max(1.0, settings.lease_seconds - settings.heartbeat_seconds)
    return write_with_retry(lambda s: _requeue(s, got, why), budget_s=budget, what="re-queueing the job")


def _requeue(s: Session, got: Claim, why: str) -> str:
    job = s.get(Job, got.job_id)
    assert job is not None
    if job.attempt >= job.max_attempts:
        msg = f"Training failed on {job.attempt} attempts ({why}); giving up (max_attempts={job.max_attempts})."
        if transition(s, got.job_id, to=JobStatus.failed, from_={JobStatus.running}, owner=got.worker_id,
                      error={"code": "worker_lost", "message": msg, "param": None}):
            add_event(s, got.job_id, msg, level="error")
            notify_terminal(s, got.job_id)
            return JobStatus.failed
        return Interrupt.lease_lost.value
    if not transition(s, got.job_id, to=JobStatus.queued, from_={JobStatus.running}, owner=got.worker_id,
                      enqueued_at=utcnow()):
        return Interrupt.lease_lost.value
    add_event(s, got.job_id, f"Training group lost on attempt {job.attempt} ({why}); re-queued to resume from "
                             "the last checkpoint", level="warn")
    return JobStatus.queued
