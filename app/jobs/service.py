"""Fine-tuning jobs: validation of the spec, creation, state transitions, events, checkpoints.
Services flush; the request dependency (or the worker's task wrapper) commits."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from app.files.service import get_file
from app.jobs import estimate, hyperparams, state
from app.jobs.estimate import EstimateOut
from app.jobs.events import add_event
from app.jobs.queue import enqueue_job
from app.jobs.schemas import CheckpointOut, EventOut, JobCreate, JobOut, ResourcesIn
from app.jobs.state import JobStatus
from app.kit import ids
from app.kit.db import utcnow
from app.kit.errors import Conflict, InvalidRequest, NotFound
from app.kit.pagination import paginate, pinned
from app.kit.storage import get_storage
from app.models_registry import repository
from app.models_registry.catalog import check_supports, get_spec
from app.orm import Checkpoint, File, Job, JobEvent, Project
from app.settings import get_settings
from app.tenancy.service import check_job_quota
from app.webhooks.service import notify_terminal, validate_webhook_url
from ml.config import (
    DEFAULT_DPO_BETA,
    EarlyStopping,
    Method,
    RecipeConfig,
    Resources,
    Task,
    TrainingKind,
    TrainingTypeConfig,
)
from ml.data.formats import TASK_FORMATS, Format
from ml.memory import gib

log = logging.getLogger(__name__)

TERMINAL = state.TERMINAL  # the SSE stream ends on these


# --- lookups --------------------------------------------------------------------------------

def get_job(session: Session, project: Project, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.project_id == project.id))
    if job is None:
        raise NotFound(f"No fine-tuning job found with id '{job_id}'.", param="fine_tuning_job_id",
                       code="fine_tuning_job_not_found")
    return job


def queue_position(session: Session, job: Job) -> int | None:
    """1-based position among queued jobs of every project (they share the GPUs)."""
    if job.status != JobStatus.queued:
        return None
    ahead = session.scalar(select(func.count()).select_from(Job).where(
        Job.status == JobStatus.queued, Job.created_at < job.created_at))
    return int(ahead or 0) + 1


def queue_positions(session: Session, jobs: list[Job]) -> dict[str, int]:
    """`queue_position` of a page's queued jobs in one statement (not one count per job)."""
    queued = [j.id for j in jobs if j.status == JobStatus.queued]
    if not queued:
        return {}
    ahead = aliased(Job)
    count = (select(func.count()).select_from(ahead)
             .where(ahead.status == JobStatus.queued, ahead.created_at < Job.created_at).scalar_subquery())
    rows = session.execute(select(Job.id, count).where(Job.id.in_(queued))).tuples()
    return {job_id: int(n or 0) + 1 for job_id, n in rows}


# --- create ---------------------------------------------------------------------------------

def _request_hash(body: JobCreate) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def method_of(body: JobCreate) -> Method:
    """OpenAI's `method.type`; top-level `hyperparameters` alone is the supervised shorthand."""
    m = body.method
    if m is None:
        return Method.supervised
    if m.type == "reinforcement":
        raise InvalidRequest("Reinforcement fine-tuning is not supported; use method type 'supervised' or 'dpo'.",
                             param="method.type", code="unsupported_method")
    for other in ("supervised", "dpo", "reinforcement"):
        if other != m.type and getattr(m, other) is not None:
            raise InvalidRequest(f"method.type is '{m.type}' but settings were given under 'method.{other}'.",
                                 param=f"method.{other}")
    return Method(m.type)


def _hyperparameter_input(body: JobCreate) -> dict[str, Any]:
    method = method_of(body)
    if body.method is not None and body.hyperparameters is not None:
        raise InvalidRequest("Pass hyperparameters either at the top level or in 'method', not both.",
                             param="hyperparameters")
    settings = body.method.settings() if body.method is not None else None
    hp = getattr(settings, "hyperparameters", None) or body.hyperparameters
    out: dict[str, Any] = hp.model_dump() if hp else {"n_epochs": "auto", "batch_size": "auto",
                                                      "learning_rate_multiplier": "auto"}
    if method is Method.dpo:
        beta = out.get("beta", "auto")
        out["beta"] = DEFAULT_DPO_BETA if beta == "auto" else float(beta)
    if body.learning_rate is not None and out["learning_rate_multiplier"] != "auto":
        raise InvalidRequest("Pass either 'learning_rate' or 'learning_rate_multiplier', not both.",
                             param="learning_rate")
    return out


def _check_training_file(file: File, task: Task, param: str, method: Method = Method.supervised) -> Format:
    if file.purpose != "fine-tune":
        raise InvalidRequest(f"File '{file.id}' has purpose '{file.purpose}'; fine-tuning needs 'fine-tune'.",
                             param=param, code="invalid_file_purpose")
    fmt = Format(file.format) if file.format else None
    if method is Method.dpo or fmt is Format.preference:
        return _check_preference_file(file, fmt, method, param)
    if fmt is None or fmt not in TASK_FORMATS[task]:
        allowed = ", ".join(sorted(f.value for f in TASK_FORMATS[task]))
        raise InvalidRequest(f"File '{file.id}' is in {fmt.value if fmt else 'an unknown'} format; task "
                             f"'{task.value}' needs one of: {allowed}.", param=param,
                             code="invalid_file_format")
    return fmt


def _check_preference_file(file: File, fmt: Format | None, method: Method, param: str) -> Format:
    """Preference pairs train DPO jobs, and DPO jobs train on nothing else."""
    if method is Method.dpo and fmt is not Format.preference:
        raise InvalidRequest(f"File '{file.id}' is in {fmt.value if fmt else 'an unknown'} format; method 'dpo' "
                             "needs preference records: {\"input\": {\"messages\": [...]}, \"preferred_output\": "
                             "[...], \"non_preferred_output\": [...]}.", param=param, code="invalid_file_format")
    if method is not Method.dpo:
        raise InvalidRequest(f"File '{file.id}' holds preference pairs; train on it with method "
                             "{\"type\": \"dpo\"}.", param=param, code="invalid_file_format")
    return Format.preference


def _check_files(train: File, valid: File | None, task: Task, method: Method = Method.supervised) -> None:
    train_fmt = _check_training_file(train, task, "training_file", method)
    labels = set((train.stats or {}).get("labels", {}))
    if task is Task.classification and len(labels) < 2:
        raise InvalidRequest(f"Classification needs at least 2 distinct labels; '{train.id}' has "
                             f"{len(labels)}.", param="training_file", code="invalid_file_format")
    if valid is None:
        return
    valid_fmt = _check_training_file(valid, task, "validation_file", method)
    if task is not Task.masked_lm and valid_fmt != train_fmt:
        raise InvalidRequest(f"Validation file is {valid_fmt.value} but training file is {train_fmt.value}.",
                             param="validation_file", code="invalid_file_format")
    unknown = set((valid.stats or {}).get("labels", {})) - labels
    if task is Task.classification and unknown:
        raise InvalidRequest(f"Validation labels not present in the training file: {sorted(unknown)[:10]}.",
                             param="validation_file", code="invalid_file_format")


def _init_checkpoint(session: Session, project: Project, ref: str | None) -> str | None:
    if ref is None:
        return None
    ckpt = repository.checkpoint_by_ref(session, project.id, ref)
    if ckpt is None:
        raise NotFound(f"No checkpoint '{ref}' in this project.", param="from_checkpoint",
                       code="checkpoint_not_found")
    return ckpt.storage_key


def _base_of(session: Session, project: Project, body: JobCreate) -> tuple[str, str | None]:
    """(catalog base model, weights to start from). `model` may be one of your `ft:` models, as on
    OpenAI: training continues from it; `from_checkpoint` picks a checkpoint instead."""
    init_key = _init_checkpoint(session, project, body.from_checkpoint)
    if not body.model.startswith("ft:"):
        return body.model, init_key
    row = repository.live_model(session, project.id, body.model)
    if row is None:
        raise NotFound(f"The model '{body.model}' does not exist.", param="model", code="model_not_found")
    return row.base_model, init_key or row.storage_key


def _build_config(session: Session, project: Project, body: JobCreate, train: File,
                  valid: File | None) -> tuple[RecipeConfig, dict[str, Any], int]:
    base_id, init_key = _base_of(session, project, body)
    spec = get_spec(base_id)
    tt = body.training_type_config()
    check_supports(spec, body.task.value, tt.type.value)
    _check_memory_options(body, tt.type, spec.is_decoder)
    method = method_of(body)
    if method is Method.dpo and (body.task is not Task.causal_lm or not spec.is_decoder or body.packing):
        raise InvalidRequest("DPO trains causal_lm jobs on decoder models, without packing.", param="method")
    if body.early_stopping is not None and valid is None:
        raise InvalidRequest("Early stopping needs a validation_file.", param="early_stopping")
    max_len = body.max_seq_length or spec.max_seq_length
    if max_len > spec.max_seq_length:
        raise InvalidRequest(f"max_seq_length {max_len} exceeds the model's limit of {spec.max_seq_length}.",
                             param="max_seq_length")
    hp_in = _hyperparameter_input(body)
    resolved = hyperparams.resolve(spec, tt.type, train.rows, hp_in["n_epochs"], hp_in["batch_size"],
                                   hp_in["learning_rate_multiplier"], body.learning_rate)
    seed = body.seed if body.seed is not None else int.from_bytes(hashlib.sha256(
        train.id.encode()).digest()[:3], "big")
    settings = get_settings()
    cfg = RecipeConfig(
        base_model=spec.id, task=body.task,
        training_type=TrainingTypeConfig(**tt.model_dump()),
        seed=seed, n_epochs=int(resolved["n_epochs"]), batch_size=int(resolved["batch_size"]),
        learning_rate=float(resolved["learning_rate"]), max_seq_length=max_len,
        warmup_ratio=body.warmup_ratio, weight_decay=body.weight_decay,
        gradient_accumulation_steps=body.gradient_accumulation_steps, lr_scheduler=body.lr_scheduler,
        max_steps=body.max_steps, max_train_seconds=body.max_train_seconds,
        training_file_key=train.storage_key, training_file_kind=(train.stats or {}).get("kind", "jsonl"),
        validation_file_key=valid.storage_key if valid else None,
        validation_file_kind=(valid.stats or {}).get("kind", "jsonl") if valid else "jsonl",
        checkpoint_every_steps=body.checkpoint_every_steps or settings.checkpoint_every_steps,
        eval_every_steps=body.eval_every_steps,
        early_stopping=EarlyStopping(**body.early_stopping.model_dump()) if body.early_stopping else None,
        init_checkpoint_key=init_key,
        cleaning=body.cleaning.model_dump() if body.cleaning else {},
        precision=body.precision, gradient_checkpointing=body.gradient_checkpointing, packing=body.packing,
        compile=body.compile,
        method=method, beta=hp_in.get("beta", DEFAULT_DPO_BETA), resources=_resources(body, tt.type, method),
    )
    hp_out = {k: resolved[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
    if method is Method.dpo:
        hp_out["beta"] = cfg.beta
    return cfg, hp_out, seed


def _resources(body: JobCreate, kind: TrainingKind, method: Method) -> Resources:
    """What one attempt runs on: `devices` per node on `nodes` workers (README "Distributed training",
    "Multi-GPU and multi-node workers"). Refused up front when no worker could ever take it."""
    res = body.resources or ResourcesIn()
    max_nodes = 1 if get_settings().embedded else get_settings().max_nodes  # embedded: one training worker
    if res.nodes > max_nodes:
        raise InvalidRequest(f"resources.nodes={res.nodes}, but at most {max_nodes} workers train one job "
                             "(TUNEHOUSE_MAX_NODES; 1 in embedded mode).", param="resources.nodes",
                             code="unsupported_resources")
    if res.strategy == "fsdp" and kind not in (TrainingKind.full, TrainingKind.freeze):
        raise InvalidRequest(f"The fsdp strategy shards full fine-tunes (training_type full or freeze), not {kind}: "
                             "use auto or ddp.", param="resources.strategy", code="unsupported_resources")
    if res.strategy == "fsdp" and body.precision == "fp16":
        raise InvalidRequest("The fsdp strategy trains in bf16 or fp32, not fp16.", param="precision",
                             code="unsupported_resources")
    limit = get_settings().worker_devices
    if res.devices > limit:
        raise InvalidRequest(f"resources.devices={res.devices}, but workers offer at most {limit} devices "
                             "(TUNEHOUSE_WORKER_DEVICES).", param="resources.devices", code="unsupported_resources")
    if res.devices * res.nodes > 1 and kind is TrainingKind.qlora:
        raise InvalidRequest("Multi-device training does not support QLoRA yet.",
                             param="resources.devices", code="unsupported_resources")
    if res.strategy == "fsdp" and method is Method.dpo:
        raise InvalidRequest("The fsdp strategy does not train DPO yet: use ddp.", param="resources.strategy",
                             code="unsupported_resources")
    return Resources(devices=res.devices, nodes=res.nodes, strategy=res.strategy)


def _check_memory_options(body: JobCreate, kind: TrainingKind, decoder: bool) -> None:
    """Shapes only: whether a worker has a GPU and bitsandbytes is for the worker to say."""
    if kind is TrainingKind.qlora and not (body.task is Task.causal_lm and decoder):
        raise InvalidRequest("QLoRA trains causal_lm jobs on decoder models only.", param="training_type",
                             code="unsupported_training_type")
    if body.packing and (body.task is not Task.causal_lm or kind is TrainingKind.prompt_tuning):
        raise InvalidRequest("packing applies to causal_lm jobs other than prompt tuning.", param="packing")


def _existing_for_key(session: Session, project: Project, key: str, request_hash: str) -> Job | None:
    job = session.scalar(select(Job).where(Job.project_id == project.id, Job.idempotency_key == key))
    if job is not None and job.request_hash != request_hash:
        raise Conflict("This Idempotency-Key was already used with a different request body.",
                       param="Idempotency-Key", code="idempotency_key_reused")
    return job


@dataclass
class Spec:
    """A validated job request: its files and the resolved recipe config."""

    train: File
    valid: File | None
    cfg: RecipeConfig
    hyperparameters: dict[str, Any]
    seed: int


def _check_integrations(body: JobCreate) -> None:
    """OpenAI's `integrations` (e.g. wandb) would otherwise be dropped silently: refuse them instead."""
    if body.integrations:
        kinds = sorted({str(i.get("type", "?")) for i in body.integrations})
        raise InvalidRequest(f"Integrations are not supported (got {', '.join(kinds)}); training metrics are in "
                             "the job's events and result file.", param="integrations", code="unsupported_integration")


def validate_spec(session: Session, project: Project, body: JobCreate,
                  lock: Literal["share"] | None = None) -> Spec:
    """Every check job creation makes (files, model, hyperparameters); `lock="share"` keeps the files
    from being deleted until the transaction ends."""
    _check_integrations(body)
    train = get_file(session, project.id, body.training_file, "training_file", lock=lock)
    valid = get_file(session, project.id, body.validation_file, "validation_file", lock=lock) \
        if body.validation_file else None
    _check_files(train, valid, body.task, method_of(body))
    cfg, hp, seed = _build_config(session, project, body, train, valid)
    return Spec(train, valid, cfg, hp, seed)


def _end_read(session: Session) -> None:
    """Ends the request's read-only transaction before tokenizing (seconds of CPU that need no row), so
    no connection, snapshot or file lock is held meanwhile; later statements start a new one."""
    if session.new or session.dirty or session.deleted:
        raise RuntimeError("pending writes before an estimate")
    session.rollback()


def _check_examples(out: EstimateOut, cfg: RecipeConfig) -> None:
    if out.examples == 0:  # the job would fail the same way in the worker
        raise InvalidRequest(f"No usable training examples after tokenization at max_seq_length "
                             f"{cfg.max_seq_length}: nothing is left to learn from.", param="max_seq_length")


def _check_memory(out: EstimateOut) -> None:
    """A job whose predicted peak clearly exceeds the workers' device memory fails now, not mid-run."""
    mem = out.memory
    if mem is None or mem.device_bytes is None or mem.peak_bytes <= mem.device_bytes:
        return
    raise InvalidRequest(
        f"This job needs about {gib(mem.peak_bytes)} of device memory at its peak (weights "
        f"{gib(mem.weights_bytes)}, gradients {gib(mem.gradients_bytes)}, optimizer {gib(mem.optimizer_bytes)}, "
        f"activations {gib(mem.activations_bytes)}; gradient checkpointing "
        f"{'on' if mem.gradient_checkpointing else 'off'}) but the workers have {gib(mem.device_bytes)}: use a "
        "smaller batch_size or max_seq_length, gradient_checkpointing, or a LoRA / QLoRA training type.",
        param="batch_size", code="insufficient_memory")


def estimate_job(session: Session, project: Project, body: JobCreate) -> EstimateOut:
    spec = validate_spec(session, project, body)
    plan = estimate.plan(session, spec.cfg, spec.train, spec.valid)
    _end_read(session)
    try:
        result = estimate.compute(plan, get_storage())
    except FileNotFoundError:
        raise NotFound("The content of a file of this request is no longer stored.", param="training_file",
                       code="file_not_found") from None
    _check_examples(result.out, spec.cfg)
    estimate.store_counts(session, plan, result.fresh)
    return result.out


def _creation_estimate(session: Session, project: Project, body: JobCreate) -> EstimateOut | None:
    """Quick (a sample of big files) and made before the job's transaction; None when it can't be made
    (the job is created without one), a 400 when nothing is left to train on."""
    spec = validate_spec(session, project, body)
    plan = estimate.plan(session, spec.cfg, spec.train, spec.valid, limit=estimate.QUICK_COUNT_ROWS)
    _end_read(session)
    try:
        out = estimate.compute(plan, get_storage()).out
    except FileNotFoundError as exc:
        log.info("no estimate for a new job on %s: %s", spec.cfg.base_model, exc)
        return None
    except Exception:
        log.warning("could not estimate a new job on %s", spec.cfg.base_model, exc_info=True)
        return None
    _check_examples(out, spec.cfg)
    _check_memory(out)
    return out


def create_job(session: Session, project: Project, body: JobCreate, idempotency_key: str | None) -> Job:
    validate_webhook_url(body.webhook_url)  # first: a refused URL costs no file reads or estimate
    request_hash = _request_hash(body)
    if idempotency_key and (prior := _existing_for_key(session, project, idempotency_key, request_hash)):
        return prior
    est = _creation_estimate(session, project, body)
    spec = validate_spec(session, project, body, lock="share")  # again: the files may have gone meanwhile
    check_job_quota(session, project)  # locks the project row: concurrent creations count each other
    train, valid, cfg, hp, seed = spec.train, spec.valid, spec.cfg, spec.hyperparameters, spec.seed
    job = Job(
        id=ids.job_id(), project_id=project.id, model=body.model, training_file=train.id,
        validation_file=valid.id if valid else None, suffix=body.suffix, seed=seed, task=body.task.value,
        training_type=cfg.training_type.model_dump(mode="json"), hyperparameters=hp,
        config=cfg.model_dump(mode="json"), status=JobStatus.validating_files, user_metadata=body.metadata,
        idempotency_key=idempotency_key, request_hash=request_hash, webhook_url=body.webhook_url,
        max_attempts=get_settings().max_attempts, result_files=[], progress={},
        devices=cfg.resources.devices, nodes=cfg.resources.nodes,
    )
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError:
        if idempotency_key and (prior := _existing_for_key(session, project, idempotency_key, request_hash)):
            return prior
        raise
    add_event(session, job.id, f"Created fine-tuning job: {job.id}")
    add_event(session, job.id, f"Validated training file: {train.id} ({train.rows} examples, {train.format})")
    if valid:
        add_event(session, job.id, f"Validated validation file: {valid.id} ({valid.rows} examples)")
    _add_estimate(session, job, est)
    mark_queued(session, job)
    return job


def _add_estimate(session: Session, job: Job, est: EstimateOut | None) -> None:
    if est is None:
        return
    job.estimated_finish = utcnow() + timedelta(seconds=est.estimated_seconds)
    session.flush()
    add_event(session, job.id, f"Estimated {est.trained_tokens:,} training tokens in {est.steps} steps, "
                               f"about {est.estimated_seconds:.0f} s ({est.basis} speed)",
              data={"estimate": est.model_dump(mode="json")})


def mark_queued(session: Session, job: Job) -> None:
    session.flush()
    if not _transition(session, job, JobStatus.queued, {JobStatus.validating_files}, enqueued_at=utcnow()):
        return  # no longer validating (cancelled): nothing to enqueue
    add_event(session, job.id, "Fine-tuning job enqueued")
    enqueue_job(session, job.id)


# --- transitions ----------------------------------------------------------------------------

def _transition(session: Session, job: Job, to: JobStatus | None, from_: Collection[JobStatus],
                **values: Any) -> bool:
    """`state.transition`, then `job` shows the row as it is now (the winner's status on a lost race)."""
    hit = state.transition(session, job.id, to=to, from_=from_, **values)
    session.refresh(job)
    return hit


def cancel_job(session: Session, project: Project, job_id: str) -> Job:
    job = get_job(session, project, job_id)
    if not _transition(session, job, JobStatus.cancelled, state.ACTIVE, cancel_requested=True,
                       pause_requested=False):
        raise Conflict(f"Job {job.id} is already {job.status} and cannot be cancelled.",
                       param="fine_tuning_job_id", code="job_not_cancellable")
    add_event(session, job.id, "Job cancelled by the user; checkpoints are kept")
    notify_terminal(session, job.id)
    return job


def pause_job(session: Session, project: Project, job_id: str) -> Job:
    """A job not yet running pauses at once; a running one is asked to (its worker saves a checkpoint
    and settles it as paused, unless it finishes first). Tried in the order a job moves, so a claim
    racing this request is caught by the second update."""
    job = get_job(session, project, job_id)
    if _transition(session, job, JobStatus.paused, state.CLAIMABLE):
        add_event(session, job.id, "Job paused")
        return job
    if _transition(session, job, None, {JobStatus.running}, pause_requested=True):
        add_event(session, job.id, "Pause requested; the worker saves a checkpoint and stops")
        return job
    raise Conflict(f"Job {job.id} is {job.status} and cannot be paused.", param="fine_tuning_job_id",
                   code="job_not_pausable")


def resume_job(session: Session, project: Project, job_id: str) -> Job:
    job = get_job(session, project, job_id)
    if not _transition(session, job, JobStatus.queued, {JobStatus.paused}, pause_requested=False,
                       enqueued_at=utcnow()):
        raise Conflict(f"Job {job.id} is {job.status}; only paused jobs can be resumed.",
                       param="fine_tuning_job_id", code="job_not_paused")
    add_event(session, job.id, "Job resumed; it continues from its last checkpoint")
    enqueue_job(session, job.id)
    return job


# --- listing --------------------------------------------------------------------------------

def list_jobs(session: Session, project: Project, after: str | None, limit: int,
              metadata: dict[str, str] | None = None) -> tuple[list[Job], bool]:
    stmt = select(Job).where(Job.project_id == project.id)
    for key, value in (metadata or {}).items():
        stmt = stmt.where(Job.user_metadata[key].as_string() == value)
    return paginate(session, stmt, Job, after, limit, Job.created_at)


def list_events(session: Session, project: Project, job_id: str, after: str | None,
                limit: int) -> tuple[list[JobEvent], bool]:
    get_job(session, project, job_id)
    return paginate(session, select(JobEvent), JobEvent, after, limit, JobEvent.seq, max_limit=1000,
                    unique_order=True, pin=(JobEvent.job_id, job_id))


def events_since(session: Session, job_id: str, seq: int, limit: int = 500,
                 upto: int | None = None) -> list[JobEvent]:
    """The job's events after `seq` (and up to `upto`), oldest first: one range of (job_id, seq)."""
    stmt = (select(JobEvent).where(pinned(session, JobEvent.job_id, job_id), JobEvent.seq > seq)
            .order_by(JobEvent.job_id, JobEvent.seq))
    if upto is not None:
        stmt = stmt.where(JobEvent.seq <= upto)
    return list(session.scalars(stmt.limit(limit)))


def list_checkpoints(session: Session, project: Project, job_id: str, after: str | None,
                     limit: int) -> tuple[list[Checkpoint], bool]:
    get_job(session, project, job_id)
    stmt = repository.checkpoints_query(project.id, job_id)
    return paginate(session, stmt, Checkpoint, after, limit, Checkpoint.step, unique_order=True)


# --- rendering ------------------------------------------------------------------------------

def _ts(dt: Any) -> int | None:
    return int(dt.timestamp()) if dt is not None else None


def method_out(job: Job) -> dict[str, Any]:
    """OpenAI's `method` object, from the stored config (rows from before DPO are supervised)."""
    kind = str((job.config or {}).get("method") or Method.supervised.value)
    return {"type": kind, kind: {"hyperparameters": dict(job.hyperparameters)}}


def to_out(session: Session, job: Job, positions: dict[str, int] | None = None) -> JobOut:
    """`positions`: precomputed `queue_positions` of a page (None: counted for this job)."""
    hp = dict(job.hyperparameters)
    position = queue_position(session, job) if positions is None else positions.get(job.id)
    return JobOut(
        id=job.id, created_at=_ts(job.created_at) or 0, finished_at=_ts(job.finished_at), model=job.model,
        fine_tuned_model=job.fine_tuned_model, organization_id=job.project_id, status=job.status,
        hyperparameters=hp, method=method_out(job),
        training_file=job.training_file, validation_file=job.validation_file, result_files=job.result_files,
        trained_tokens=job.trained_tokens, error=job.error, seed=job.seed, suffix=job.suffix,
        user_provided_suffix=job.suffix, estimated_finish=_ts(job.estimated_finish),
        metadata=job.user_metadata, task=job.task, training_type=job.training_type, config=job.config,
        attempt=job.attempt, max_attempts=job.max_attempts, queue_position=position,
        progress=job.progress or {}, evaluation=job.evaluation, started_at=_ts(job.started_at),
        resources=Resources.model_validate((job.config or {}).get("resources") or {}).model_dump(),
    )


def event_out(e: JobEvent) -> EventOut:
    return EventOut(id=e.id, created_at=_ts(e.created_at) or 0, level=e.level, message=e.message,
                    data=e.data, type=e.type)


def checkpoint_out(c: Checkpoint) -> CheckpointOut:
    metrics = {"step": c.step, **c.metrics}
    return CheckpointOut(id=c.id, created_at=_ts(c.created_at) or 0,
                         fine_tuned_model_checkpoint=c.fine_tuned_model_checkpoint,
                         fine_tuning_job_id=c.job_id, step_number=c.step, metrics=metrics, epoch=c.epoch,
                         is_best=c.is_best)


def fine_tuned_model_name(job: Job, project: Project) -> str:
    return repository.ft_name(job.config.get("base_model", job.model), project.name, job.suffix, job.id)
