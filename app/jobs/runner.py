"""Runs one fine-tuning job: claim, resume from the last checkpoint, train under a lease, then
register the model. Every write that settles the job's fate is conditional on still holding the
lease, so a worker that lost its job (cancelled, reaped) can never overwrite the outcome."""

from __future__ import annotations

import csv
import io
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.orm import Session

from app.files.status import FileStatus
from app.jobs.eta import live_eta
from app.jobs.events import add_event, job_metric_curve
from app.jobs.gang import Gang, Seat, SeatHeartbeat, dissolve, open_gang, take_seat, wait_for_followers
from app.jobs.gang import close as close_gang
from app.jobs.lease import Claim, Heartbeat, claim, claim_next
from app.jobs.queue import top_up
from app.jobs.service import fine_tuned_model_name
from app.jobs.state import JobStatus, transition
from app.kit import ids
from app.kit.db import after_commit, session_scope, utcnow
from app.kit.dbretry import is_transient, write_with_retry
from app.kit.logging import log_context
from app.kit.storage import Storage, get_storage, staged_file
from app.models_registry import repository
from app.models_registry.catalog import local_base
from app.orm import Checkpoint, File, FineTunedModel, Job, Project
from app.settings import get_settings
from app.tenancy.service import add_usage, metered_attempt
from app.webhooks.service import notify_terminal
from ml.checkpoint import CheckpointInfo, has_training_state
from ml.config import EventLevel, Interrupt, RecipeConfig, TrainOutcome
from ml.errors import InputError

if TYPE_CHECKING:
    from app.jobs.distributed import Inputs

log = logging.getLogger(__name__)
T = TypeVar("T")


LAUNCH_KEYS = ("world_size", "strategy", "backend", "device", "parameters_on_rank")


class JobHooks:
    """The runner's side of the recipe contract: events, progress and checkpoints in the DB. Each write
    rides out a short database outage (retried in a new session) for as long as the lease can outlive
    one, so a blip costs a pause in training, not an attempt."""

    def __init__(self, claim: Claim, hb: Heartbeat, job: Job, ft_name: str, storage: Storage) -> None:
        self.claim, self.hb, self.storage = claim, hb, storage
        self.job_id, self.project_id, self.ft_name = job.id, job.project_id, ft_name
        self._last_progress = 0.0
        self._launch: dict[str, Any] | None = None  # how the attempt runs, once the recipe says (progress.launch)
        self._nodes = job.nodes
        self._eta = _write(lambda s: live_eta(s, job.id), "the job's estimate")

    def message(self, text: str, level: EventLevel = "info", data: dict[str, Any] | None = None) -> None:
        if data is not None and "world_size" in data:  # the first training event
            self._launch = {"nodes": self._nodes, **{k: data[k] for k in LAUNCH_KEYS if k in data}}
        _write(lambda s: add_event(s, self.job_id, text, level=level, data=data), "a job event")

    def metrics(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, **{k: float(v) for k, v in values.items()}, "attempt": self.claim.attempt}
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items() if k != "epoch")
        _write(lambda s: add_event(s, self.job_id, f"Step {step}: {shown}", type="metrics", data=row), "metrics")

    def progress(self, step: int, total_steps: int, epoch: float, trained_tokens: int) -> None:
        now = time.monotonic()
        if now - self._last_progress < 2.0 and step < total_steps:
            return
        self._last_progress = now
        eta = self._eta.remaining(step, total_steps, now)  # the steps left at this attempt's pace + the tail
        values: dict[str, Any] = {
            "progress": {"step": step, "total_steps": total_steps, "epoch": round(epoch, 4),
                         "eta_seconds": round(eta, 1) if eta is not None else None,
                         **({"launch": self._launch} if self._launch else {})},
            "trained_tokens": trained_tokens,
        }
        if eta is not None:
            values["estimated_finish"] = utcnow() + timedelta(seconds=eta)
        _write(lambda s: _settle(s, self.claim, None, **values), "progress")

    def interrupted(self) -> Interrupt | None:
        return self.hb.interrupt

    def checkpoint(self, local_dir: Path, info: CheckpointInfo) -> None:
        key = f"jobs/{self.job_id}/checkpoints/step-{info.step:08d}"
        self.storage.put_dir(key, local_dir)
        _write(partial(self._register_checkpoint, key, info), "checkpoint registration")

    def _register_checkpoint(self, key: str, info: CheckpointInfo, s: Session) -> None:
        if not _settle(s, self.claim, None, heartbeat_at=utcnow()):  # locks the row until commit
            return
        row = repository.checkpoint_at(s, self.job_id, info.step)
        if row is None:
            row = Checkpoint(id=ids.checkpoint_id(), job_id=self.job_id, project_id=self.project_id,
                             step=info.step, storage_key=key,
                             fine_tuned_model_checkpoint=repository.checkpoint_name(self.ft_name, info.step))
            s.add(row)
        row.epoch, row.metrics = info.epoch, dict(info.metrics)
        s.flush()
        _mark_best(s, self.job_id)
        add_event(s, self.job_id, f"Checkpoint saved at step {info.step} (epoch {info.epoch:.2f})",
                  data={"checkpoint": row.id, "step": info.step, "metrics": info.metrics})
        prune_checkpoints(s, self.storage, self.job_id, get_settings().keep_checkpoints)


def _write(fn: Callable[[Session], T], what: str) -> T:
    """A worker's write, retried through a database blip while the lease still holds: the heartbeat
    renews it every `heartbeat_seconds`, so one that failed once has `lease - heartbeat` left."""
    settings = get_settings()
    budget = max(1.0, settings.lease_seconds - settings.heartbeat_seconds)
    return write_with_retry(fn, budget_s=budget, what=what)


def prune_checkpoints(s: Session, storage: Storage, job_id: str, keep: int) -> list[str]:
    """Keep the newest `keep` checkpoints (resume needs the latest) plus the best; 0 keeps all.
    Weights are deleted only once the rows' deletion is committed."""
    if keep <= 0:
        return []
    rows = repository.job_checkpoints(s, job_id)
    doomed = [c for c in rows[keep:] if not c.is_best]
    for c in doomed:
        s.delete(c)
        after_commit(s, partial(storage.delete, c.storage_key))
    s.flush()
    return [c.id for c in doomed]


def _mark_best(s: Any, job_id: str) -> None:
    rows = repository.job_checkpoints(s, job_id)

    def score(c: Checkpoint) -> float:
        return float(c.metrics.get("valid_loss", c.metrics.get("train_loss", float("inf"))))
    best = min(rows, key=score, default=None)
    for c in rows:
        c.is_best = c is best


# --- the job --------------------------------------------------------------------------------

def run_next(worker_id: str) -> str:
    """Entry point of the Celery task (a claim token): run the next job in fair order. Returns what
    happened (for logs and tests)."""
    seat = take_seat(worker_id)  # an open gang first: its leader already holds a job and waits
    if seat is not None:
        return _follow(seat)
    got = claim_next(worker_id)
    if got is None:
        log.info("nothing to claim (surplus token, or every queued project is at its running limit)")
        return "skipped"
    try:
        done = _run(got)
        if done == "yielded":  # it gave its job back to join an older gang (`app.jobs.gang`)
            seat = take_seat(worker_id)
            return _follow(seat) if seat is not None else done
        return done
    finally:
        _top_up()  # this job's slot is free: a job of its project held back by the limit may go now


def run_job(job_id: str, worker_id: str) -> str:
    """Run this job (tests, benchmarks, operator tools). Returns what happened."""
    got = claim(job_id, worker_id)
    if got is None:
        log.info("nothing to claim (duplicate delivery or finished job)", extra={"job_id": job_id})
        return "skipped"
    return _run(got)


def _run(got: Claim) -> str:
    with log_context(job_id=got.job_id, attempt=got.attempt), Heartbeat(got) as hb, metered_attempt(got.job_id):
        try:
            return _execute(got, hb)
        except Exception as exc:
            log.exception("job failed", extra={"job_id": got.job_id})
            _fail(got, exc)
            return JobStatus.failed


def _top_up() -> None:
    try:
        top_up()
    except Exception:  # the reaper tops up too
        log.exception("could not top up the training queue")


def _load(job_id: str) -> tuple[Job, RecipeConfig, str, Checkpoint | None]:
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        project = s.get(Project, job.project_id)
        assert project is not None
        latest = repository.latest_checkpoint(s, job_id)
        s.expunge_all()
    return job, RecipeConfig.model_validate(job.config), fine_tuned_model_name(job, project), latest


def _execute(got: Claim, hb: Heartbeat) -> str:
    from ml.runtime import configure_threads
    from ml.training import build_recipe

    threads = configure_threads(get_settings().torch_threads)

    job, cfg, ft_name, latest = _load(got.job_id)
    storage = get_storage()
    hooks = JobHooks(got, hb, job, ft_name, storage)
    resume = _resume_dir(storage, latest.storage_key if latest else None)
    gang: Gang | None = None
    res = cfg.resources
    if res.nodes > 1:
        formed = _form_gang(got, hb, cfg, latest if resume else None)
        if isinstance(formed, str):
            return formed
        gang = formed
    where = f" on {res.nodes} nodes x {res.devices} device(s)" if gang else ""
    hooks.message(f"Fine-tuning job started (attempt {got.attempt} of {job.max_attempts}){where}"
                  + (f"; resuming from checkpoint at step {latest.step}" if resume and latest else ""),
                  data={"attempt": got.attempt, "resumed_from_step": latest.step if resume and latest else None,
                        "torch_threads": threads, "nodes": res.nodes, "world_size": res.nodes * res.devices})
    workdir = Path(tempfile.mkdtemp(prefix=f"{job.id}-", dir=storage.staging_dir()))
    if res.devices > 1 or gang is not None:
        return _execute_group(got, hb, hooks, job, cfg, storage, workdir, resume, ft_name, threads, gang)
    recipe = build_recipe(
        cfg, hooks, workdir=workdir, train_path=storage.local_file(cfg.training_file_key),
        valid_path=storage.local_file(cfg.validation_file_key) if cfg.validation_file_key else None,
        resume_dir=resume,
        init_dir=storage.local_dir(cfg.init_checkpoint_key) if cfg.init_checkpoint_key else None,
        base=local_base(cfg.base_model), device=get_settings().device,
    )
    try:
        recipe.setup()
        outcome = recipe.train()
        if not outcome.completed:
            return _interrupted(got, outcome)
        final = workdir / "final"
        info = recipe.save_checkpoint(final, with_state=False)
        from ml.evaluation import safe_report

        report = safe_report(recipe, job.validation_file, hooks)  # before the final transaction
        return _succeed(got, storage, final, info, outcome, ft_name, report)
    finally:
        recipe.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def _resume_dir(storage: Storage, key: str | None) -> Path | None:
    resume = storage.local_dir(key) if key else None
    return resume if resume is not None and has_training_state(resume) else None


def _inputs(storage: Storage, cfg: RecipeConfig, job: Job, resume: Path | None) -> Inputs:
    from app.jobs.distributed import Inputs

    return Inputs(
        train_path=storage.local_file(cfg.training_file_key),
        valid_path=storage.local_file(cfg.validation_file_key) if cfg.validation_file_key else None,
        resume_dir=resume, init_dir=storage.local_dir(cfg.init_checkpoint_key) if cfg.init_checkpoint_key else None,
        validation_file=job.validation_file,
    )


def _execute_group(got: Claim, hb: Heartbeat, hooks: JobHooks, job: Job, cfg: RecipeConfig, storage: Storage,
                   workdir: Path, resume: Path | None, ft_name: str, threads: int, gang: Gang | None) -> str:
    """`resources.devices > 1` or a gang: the attempt runs as a torchrun group (`app.jobs.distributed`)."""
    from app.jobs.distributed import GroupDied, requeue, run_group
    from ml.checkpoint import read_info

    try:
        result = run_group(cfg, hooks, hb, workdir, _inputs(storage, cfg, job, resume), threads, gang)
        if result.final is None:
            return _interrupted(got, result.outcome)
        info = read_info(result.final)
        return _succeed(got, storage, result.final, info, result.outcome, ft_name, result.report)
    except GroupDied as exc:
        return requeue(got, str(exc))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if gang is not None:
            _close_gang(gang)


# --- gangs (`app.jobs.gang`) ----------------------------------------------------------------------

def _form_gang(got: Claim, hb: Heartbeat, cfg: RecipeConfig, resume_from: Checkpoint | None) -> Gang | str:
    """The leader's wait for its followers; a string (what happened) when the gang did not form."""
    res = cfg.resources
    gang = open_gang(got, res.nodes, res.devices, resume_from.storage_key if resume_from else None)
    waited = wait_for_followers(gang, hb, get_settings().gang_timeout_seconds)
    if waited == "formed":
        return gang
    if waited in ("timeout", "yield"):
        return dissolve(gang, yielded=waited == "yield")
    with session_scope() as s:  # interrupted while waiting: nothing was trained
        close_gang(s, gang)
        if waited is Interrupt.paused:
            return _pause(s, got, resume_from.step if resume_from else 0)
    return str(waited)  # an Interrupt


def _close_gang(gang: Gang) -> None:
    try:
        with session_scope() as s:
            close_gang(s, gang)
    except Exception:  # the reaper sweeps seats of attempts that are over
        log.exception("could not close the gang", extra={"job_id": gang.claim.job_id})


def _follow(seat: Seat) -> str:
    """A follower's node: wait for the leader's go, then run this node's share of the attempt. It writes
    nothing about the job (the leader does); returns what happened, for logs and tests."""
    from app.jobs.distributed import run_follower
    from ml.runtime import configure_threads

    settings = get_settings()
    rank = seat.rendezvous.node_rank
    with log_context(job_id=seat.job_id, attempt=seat.attempt, node_rank=rank), SeatHeartbeat(seat) as hb:
        deadline = time.monotonic() + settings.gang_timeout_seconds + settings.lease_seconds
        while not hb.go.wait(0.5):
            if hb.ended.is_set() or time.monotonic() > deadline:
                log.info("the gang was dissolved before it started")
                return "dissolved"
        job, cfg, _, _ = _load(seat.job_id)
        storage = get_storage()
        workdir = Path(tempfile.mkdtemp(prefix=f"{job.id}-node{rank}-", dir=storage.staging_dir()))
        try:
            inputs = _inputs(storage, cfg, job, _resume_dir(storage, seat.resume_key))
            rc = run_follower(cfg, seat, hb, workdir, inputs, configure_threads(settings.torch_threads))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return "follower_done" if rc == 0 else "follower_failed"


def _settle(s: Session, got: Claim, to: JobStatus | None, **values: Any) -> bool:
    """A write of this worker's: only while the job is running under its lease. False means a cancel
    or the reaper got there first; that outcome stands and nothing that depends on this one is written."""
    return transition(s, got.job_id, to=to, from_={JobStatus.running}, owner=got.worker_id, **values)


def _interrupted(got: Claim, outcome: TrainOutcome) -> str:
    reason = outcome.interrupt or Interrupt.lease_lost
    with session_scope() as s:
        if reason is Interrupt.paused:
            return _pause(s, got, outcome.step)
        if reason is Interrupt.cancelled:
            add_event(s, got.job_id, f"Training stopped at step {outcome.step} after cancellation")
    return reason.value


def _pause(s: Session, got: Claim, step: int) -> str:
    # A pause is not a lost worker: give the attempt back so pauses never use up max_attempts.
    if not _settle(s, got, JobStatus.paused, pause_requested=False, attempt=Job.attempt - 1):
        return Interrupt.lease_lost.value
    add_event(s, got.job_id, f"Job paused at step {step}; resume continues from here")
    return Interrupt.paused.value


def _result_csv(rows: list[dict[str, Any]]) -> bytes:
    cols = ["step", *sorted({k for r in rows for k in r} - {"step"})]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    for r in rows:
        writer.writerow(r)
    return buf.getvalue().encode()


def _store_result_file(s: Session, storage: Storage, job: Job) -> str:
    """The step metrics of every attempt, one row per step (`app.jobs.events.metric_curve`)."""
    rows = job_metric_curve(s, job.id)
    file_id = ids.file_id()
    key = f"files/{job.project_id}/{file_id}.csv"
    data = _result_csv(rows)
    with staged_file(storage, suffix=".csv") as tmp:
        tmp.write_bytes(data)
        storage.put_file(key, tmp)
    s.add(File(id=file_id, project_id=job.project_id, purpose="fine-tune-results", filename="step_metrics.csv",
               bytes=len(data), status=FileStatus.processed, format="csv", rows=len(rows), storage_key=key,
               stats={"kind": "csv"}))
    return file_id


def _succeed(got: Claim, storage: Storage, final: Path, info: CheckpointInfo,
             outcome: TrainOutcome, ft_name: str, evaluation: dict[str, Any] | None = None) -> str:
    # One key per attempt: a worker that lost the job never overwrites the weights the winner registered.
    key = f"jobs/{got.job_id}/final-{got.attempt}"
    storage.put_dir(key, final)
    record = partial(_record_success, got, storage, key, info, outcome, ft_name, evaluation)
    return _write(record, "the job's success")  # one transaction: a retry starts it over


def _record_success(got: Claim, storage: Storage, key: str, info: CheckpointInfo, outcome: TrainOutcome,
                    ft_name: str, evaluation: dict[str, Any] | None, s: Session) -> str:
    # Settle first: the rest (model, result file, events, webhook) is written only if this hit.
    if not _settle(s, got, JobStatus.succeeded, fine_tuned_model=ft_name, trained_tokens=outcome.trained_tokens):
        after_commit(s, partial(storage.delete, key))
        return "lease_lost"
    job = s.get(Job, got.job_id)
    assert job is not None
    _late_pause(s, job)
    add_usage(s, job.project_id, trained_tokens=outcome.trained_tokens)
    best = repository.best_checkpoint(s, job.id)
    base = job.config.get("base_model", job.model)
    s.add(FineTunedModel(id=ft_name, project_id=job.project_id, job_id=job.id, base_model=base, task=job.task,
                         training_type=info.training_type.value, storage_key=key,
                         checkpoint_id=best.id if best else None,
                         info={"label_names": info.label_names, "metrics": outcome.final_metrics,
                               "best_checkpoint": best.id if best else None}))
    job.result_files = [_store_result_file(s, storage, job)]
    job.progress = {**(job.progress or {}), "step": outcome.step, "eta_seconds": 0}
    if outcome.stopped_early:
        add_event(s, job.id, f"Early stopping at step {outcome.step}: validation loss stopped improving")
    if evaluation is not None:
        from ml.evaluation import summary

        job.evaluation = evaluation
        add_event(s, job.id, summary(evaluation), data={"evaluation": evaluation})
    add_event(s, job.id, f"New fine-tuned model created: {ft_name}")
    add_event(s, job.id, "The job has successfully completed")
    notify_terminal(s, job.id)
    return JobStatus.succeeded


def _late_pause(s: Session, job: Job) -> None:
    """Training finished before the worker saw a pause request: the result stands, the request is
    answered with an event instead of being dropped."""
    if job.pause_requested:
        job.pause_requested = False
        add_event(s, job.id, "Pause request came too late: training had already finished", level="warn")


def _fail(got: Claim, exc: Exception) -> None:
    if is_transient(exc):
        # The database stayed away longer than the lease's slack: not the job's fault. Its lease runs
        # out and the reaper re-queues it (an attempt spent), resuming from its last checkpoint.
        log.warning("database unavailable; leaving the job to the reaper", extra={"job_id": got.job_id})
        return
    # Only the library's own input errors are the user's to fix; anything else (torch, peft, a bug) is ours.
    user_error = isinstance(exc, InputError)
    code = exc.code if isinstance(exc, InputError) else "internal_error"
    message = str(exc) if user_error else f"Training failed: {type(exc).__name__}: {exc}"
    _write(partial(_record_failure, got, code, message[:2000]), "the job's failure")


def _record_failure(got: Claim, code: str, message: str, s: Session) -> None:
    if not _settle(s, got, JobStatus.failed, error={"code": code, "message": message, "param": None}):
        return
    add_event(s, got.job_id, f"Job failed: {message}", level="error")
    notify_terminal(s, got.job_id)
