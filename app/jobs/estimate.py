"""How big and how long a fine-tuning job is, before it runs (`POST /v1/fine_tuning/estimate`, and
`estimated_finish` at job creation).

Tokens: the stored files are tokenized with the base model's own tokenizer exactly the way the
trainer builds its examples (`ml.data.tokens.token_lengths`: chat template, eos, truncation at
max_seq_length, text windows), streaming over the records. No torch: the tokenizer is loaded without
`AutoTokenizer`. Each thread has its own tokenizer instances (a fast tokenizer's truncation setting is
per-instance state), so no lock is shared across requests. Files above a row limit are estimated
from evenly spaced sample rows (JSONL: seeks, so a big file costs no more than a small one) and
scaled by the file's row count. Counts are cached in `File.stats["token_counts"]`.

Phases, so that tokenizing (seconds) holds no transaction: `plan` reads the database (files, cached
counts, measured speed), `compute` tokenizes without a session, `store_counts` caches fresh counts.

Steps count micro-batches of examples, or of packed rows when the job packs (`ml.data.packing`, the
plan the trainer uses). Memory: the peak per device predicted by `ml.memory` from the base model's
config.json and safetensors headers, for the job's longest batch; `fits` compares it with
`settings.worker_device_memory_bytes` (null when that is unknown). `precision: auto` counts as bf16
activations unless the server's `device` setting is "cpu" (the workers' devices are not known here),
and `gradient_checkpointing: auto` as on when the job would not fit without it.

Duration (`app.jobs.eta`): every phase of the job, not only its training steps: the queue ahead, model
load and tokenization, training steps, evaluation passes, checkpoint saves, the end-of-job evaluation
report and the final save, returned as `breakdown`. Training speed is the mean `tokens_per_second` of the
training metrics events of the most recent succeeded jobs with the same base model and training type
("measured"), else `eta.DEFAULT_SPEEDS` ("default", measured on a 2-core CPU box with one torch thread,
scaled for the workers' torch threads: a GPU is much faster, so the first succeeded job fixes the basis).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.jobs import eta
from app.jobs.state import JobStatus
from app.kit.db import utcnow
from app.kit.storage import Storage
from app.models_registry.catalog import get_spec
from app.orm import File, Job, JobEvent
from app.settings import get_settings
from ml import memory
from ml.config import Method, RecipeConfig, Task, TrainingKind
from ml.data.formats import BOM, iter_records, normalize
from ml.data.packing import packed_row_count
from ml.data.tokens import load_tokenizer_no_torch, token_lengths
from ml.models.tokenizer_dir import tokenizer_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FULL_COUNT_ROWS = 20_000  # the estimate endpoint counts every row up to this many, then samples
QUICK_COUNT_ROWS = 2_000  # job creation (must stay fast) samples above this
CHUNK = 1_000  # records tokenized per call
RECENT_JOBS = 20  # succeeded jobs averaged for the measured speed
STARTED = utcnow()  # this API process's start: a job started since then means a warm worker (embedded mode)
AHEAD = (JobStatus.validating_files, JobStatus.queued, JobStatus.running)  # statuses a new job waits behind
_local = threading.local()  # per thread: {model id: tokenizer}


class MemoryOut(BaseModel):
    """Predicted peak memory of one training device (`ml.memory`)."""

    weights_bytes: int = Field(description="Model weights on the device.")
    gradients_bytes: int = Field(description="Gradients of the trainable weights.")
    optimizer_bytes: int = Field(description="Optimizer state (AdamW: two fp32 moments per trainable weight).")
    activations_bytes: int = Field(description="Activations of the job's largest batch.")
    peak_bytes: int = Field(description="Predicted peak: the sum of the above.")
    device_bytes: int | None = Field(
        description="A worker device's memory (TUNEHOUSE_WORKER_DEVICE_MEMORY_BYTES); null when unknown.")
    fits: bool | None = Field(description="Peak within 90% of device_bytes; null when that is unknown.")
    gradient_checkpointing: bool = Field(
        description="Whether this estimate assumes gradient checkpointing (`auto` resolved).")


class BreakdownOut(BaseModel):
    """Predicted seconds per phase of the job (`app.jobs.eta`)."""

    queue: float = Field(description="Waiting for the jobs ahead and for a worker to take it.")
    setup: float = Field(description="Loading the model, reading and tokenizing the files (DPO: scoring "
                                     "the reference model).")
    train: float = Field(description="The training steps.")
    evaluations: float = Field(description="Evaluation passes over the validation file during training.")
    checkpoints: float = Field(description="Checkpoint saves (weights and optimizer state).")
    report: float = Field(description="The end-of-job evaluation report (base vs fine-tuned).")
    final: float = Field(description="Saving and registering the final model.")
    run: float = Field(description="All but the queue: started -> finished.")
    total: float = Field(description="created -> finished.")


class CountsOut(BaseModel):
    evaluations: int = Field(description="Evaluation passes over the validation file.")
    checkpoints: int = Field(description="Checkpoints saved.")
    checkpoint_bytes: int = Field(description="Bytes of one checkpoint (weights or adapter, optimizer state).")
    speedup: float = Field(description="Compute speed relative to the speed table (torch threads and host "
                                       "load, or measured / default training speed).")
    load_factor: float = Field(1.0, description="Embedded mode: speed from the host's load average now vs "
                                                "the table's (1 elsewhere).")


class EstimateOut(BaseModel):
    object: Literal["fine_tuning.estimate"] = Field(
        "fine_tuning.estimate", description="Always `fine_tuning.estimate`.")
    model: str = Field(description="The base model.")
    task: str = Field(description="The training task.")
    training_type: str = Field(description="The training type.")
    train_tokens: int = Field(description="Tokens of one pass over the training file, as the trainer counts them.")
    validation_tokens: int = Field(description="Tokens of the validation file.")
    examples: int = Field(description="Training examples after tokenization (text windows, skipped rows).")
    validation_examples: int = Field(description="Validation examples after tokenization.")
    n_epochs: int = Field(description="Epochs the job would run (`auto` resolved).")
    batch_size: int = Field(description="Batch size the job would use (`auto` resolved).")
    steps: int = Field(description="Optimizer steps of the whole job.")
    trained_tokens: int = Field(description="train_tokens x n_epochs: the job's `trained_tokens` when it succeeds.")
    tokens_per_second: float = Field(description="Training throughput the estimate assumes.")
    estimated_seconds: float = Field(
        description="Predicted wall time from creation to the end: queue_seconds + run_seconds.")
    queue_seconds: float = Field(0.0, description="Predicted wait before a worker starts it: the jobs ahead "
                                                  "(one training worker assumed) and the hand-over.")
    run_seconds: float = Field(0.0, description="Predicted time from the start of training to the end.")
    breakdown: BreakdownOut | None = Field(None, description="The prediction per phase (seconds).")
    counts: CountsOut | None = Field(None, description="What the phases count.")
    basis: Literal["measured", "default"] = Field(
        description="`measured`: throughput from this model's past jobs; `default`: a built-in guess.")
    sampled: bool = Field(description="Whether counts were scaled up from a sample of rows.")
    packed_rows: int | None = Field(None, description="With packing: the rows the examples fill (steps count these).")
    memory: MemoryOut | None = Field(
        None, description="Predicted peak memory of one device; null when the base model's config cannot be read.")


@dataclass
class TokenCount:
    tokens: int = 0
    examples: int = 0
    sampled: bool = False
    longest: int = 0  # the longest example (of the sample)
    packed_rows: int = 0  # rows of max_seq_length the examples pack into

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "examples": self.examples, "sampled": self.sampled,
                "longest": self.longest, "packed_rows": self.packed_rows}


def base_tokenizer(model_id: str) -> PreTrainedTokenizerBase:
    """This thread's instance of the catalog base model's tokenizer, from local files (never the network;
    a builtin model's weights are not built for it). Never share it with another thread: calls set
    truncation on the instance."""
    cache: dict[str, PreTrainedTokenizerBase] = _local.__dict__.setdefault("tokenizers", {})
    if model_id not in cache:
        cache[model_id] = load_tokenizer_no_torch(tokenizer_dir(get_spec(model_id), get_settings().data_dir))
    return cache[model_id]


# --- reading rows ---------------------------------------------------------------------------------

def _sample_jsonl(path: Path, n: int) -> Iterator[dict[str, Any]]:
    """About n records at evenly spaced byte offsets (the line starting after each offset)."""
    size = path.stat().st_size
    seen: set[int] = set()
    with open(path, "rb") as fh:
        for i in range(n):
            fh.seek(size * i // n)
            if i:
                fh.readline()  # finish the line the offset fell into
            start, raw = fh.tell(), fh.readline()
            if start in seen or not raw.strip():
                continue
            seen.add(start)
            yield normalize(json.loads(raw.removeprefix(BOM)))[1]


def _rows(path: Path, kind: str, rows: int, limit: int) -> tuple[Iterator[dict[str, Any]], bool]:
    if rows <= limit:
        return iter_records(path, kind), False
    if kind == "jsonl":
        return _sample_jsonl(path, limit), True
    return islice(iter_records(path, kind), limit), True  # CSV records may span lines: take the head


def _chunks(records: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    while chunk := list(islice(records, CHUNK)):
        yield chunk


def count_file_tokens(path: Path, kind: str, rows: int, cfg: RecipeConfig, limit: int) -> TokenCount:
    spec = get_spec(cfg.base_model)
    tok = base_tokenizer(spec.id)
    records, sampled = _rows(path, kind, rows, limit)
    lengths: list[int] = []
    read = 0
    for chunk in _chunks(records):
        lengths += token_lengths(chunk, Task(cfg.task), tok, effective_max_len(cfg), spec.architecture == "decoder")
        read += len(chunk)
    scale = rows / read if sampled and read else 1.0
    packed = packed_row_count(lengths, effective_max_len(cfg))
    return TokenCount(round(sum(lengths) * scale), round(len(lengths) * scale), sampled, max(lengths, default=0),
                      round(packed * scale))


def effective_max_len(cfg: RecipeConfig) -> int:
    tt = cfg.training_type
    virtual = tt.num_virtual_tokens if tt.type is TrainingKind.prompt_tuning else 0
    return max(8, cfg.max_seq_length - virtual)


# --- cached counts --------------------------------------------------------------------------------

def _cache_key(cfg: RecipeConfig) -> str:
    return f"{cfg.task}/{cfg.base_model}/{effective_max_len(cfg)}"


def _cached(file: File, cfg: RecipeConfig) -> TokenCount | None:
    hit = ((file.stats or {}).get("token_counts") or {}).get(_cache_key(cfg))
    if not hit or hit.get("sha256") != file.sha256 or "packed_rows" not in hit:  # counted before packing: again
        return None
    return TokenCount(int(hit["tokens"]), int(hit["examples"]), bool(hit["sampled"]), int(hit["longest"]),
                      int(hit["packed_rows"]))


def _store(file: File, cfg: RecipeConfig, count: TokenCount) -> None:
    stats = dict(file.stats or {})
    counts = dict(stats.get("token_counts") or {})
    counts[_cache_key(cfg)] = {**count.as_dict(), "sha256": file.sha256}
    file.stats = {**stats, "token_counts": counts}  # a new dict: the JSON column sees the change


@dataclass(frozen=True)
class StoredFile:
    """A file to count, as its row read when the estimate was planned: no ORM object outlives the read."""

    id: str
    storage_key: str
    kind: str
    rows: int
    sha256: str | None
    cached: TokenCount | None

    @classmethod
    def of(cls, file: File, cfg: RecipeConfig) -> StoredFile:
        return cls(file.id, file.storage_key, (file.stats or {}).get("kind", "jsonl"), file.rows, file.sha256,
                   _cached(file, cfg))


# --- speed and the estimate -----------------------------------------------------------------------

def measured_tokens_per_second(session: Session, model: str, kind: str) -> float | None:
    recent = (select(Job.id).where(Job.status == JobStatus.succeeded, Job.model == model,
                                   Job.training_type["type"].as_string() == kind)
              .order_by(Job.finished_at.desc()).limit(RECENT_JOBS))
    value = session.scalar(select(func.avg(JobEvent.data["tokens_per_second"].as_float())).where(
        JobEvent.job_id.in_(recent.scalar_subquery()), JobEvent.type == "metrics"))
    return float(value) if value else None


def default_tokens_per_second(model: str, kind: TrainingKind) -> float:
    """The speed table's training tokens/s (one torch thread), before the thread factor."""
    return eta.speeds_for(model, None).train_tokens_per_second[kind]


def _steps(cfg: RecipeConfig, examples: int, epochs: int) -> int:
    micro = math.ceil(examples / cfg.batch_size)
    return math.ceil(micro / max(1, cfg.gradient_accumulation_steps)) * epochs


def host_load_factor(embedded: bool, device: str) -> float:
    """Embedded mode on a CPU: the worker shares this host, so its load average tells the worker's speed."""
    if not embedded or device not in ("cpu", "auto") or not hasattr(os, "getloadavg"):
        return 1.0
    return eta.load_factor(os.getloadavg()[0], os.cpu_count() or 1)


def cold_worker(session: Session) -> bool:
    """No job started since this API process did: in embedded mode its worker started with it and has
    not imported torch nor loaded a model yet (elsewhere a guess that errs by one cold start)."""
    return session.scalar(select(Job.id).where(Job.started_at >= STARTED).limit(1)) is None


def queue_seconds(session: Session) -> float:
    finishes = session.scalars(select(Job.estimated_finish).where(
        Job.status.in_(AHEAD), Job.estimated_finish.is_not(None))).all()
    return eta.queue_seconds([f for f in finishes if f is not None], utcnow())


@dataclass(frozen=True)
class Plan:
    """What an estimate needs from the database; `compute` needs no session."""

    cfg: RecipeConfig
    train: StoredFile
    valid: StoredFile | None
    measured_tps: float | None
    limit: int  # rows counted exactly before sampling
    queue_seconds: float = 0.0
    generates: bool = False  # the evaluation report generates answers (causal LM on prompts)
    cold: bool = False  # no job started since this process did


@dataclass(frozen=True)
class Result:
    out: EstimateOut
    fresh: dict[str, TokenCount]  # file id -> counts made now (not from the cache)


def plan(session: Session, cfg: RecipeConfig, train: File, valid: File | None, *,
         limit: int | None = None) -> Plan:
    """Reads only. `limit` defaults to FULL_COUNT_ROWS."""
    kind = TrainingKind(cfg.training_type.type)
    generates = (cfg.task == Task.causal_lm and cfg.method is not Method.dpo and valid is not None
                 and valid.format in ("chat", "prompt_completion"))
    return Plan(cfg, StoredFile.of(train, cfg), StoredFile.of(valid, cfg) if valid else None,
                measured_tokens_per_second(session, cfg.base_model, kind.value), limit or FULL_COUNT_ROWS,
                queue_seconds(session), generates, cold_worker(session))


def _count(file: StoredFile | None, p: Plan, storage: Storage, fresh: dict[str, TokenCount]) -> TokenCount:
    if file is None:
        return TokenCount()
    if file.cached is not None:
        return file.cached
    count = count_file_tokens(storage.local_file(file.storage_key), file.kind, file.rows, p.cfg, p.limit)
    fresh[file.id] = count
    return count


def compute(p: Plan, storage: Storage) -> Result:
    """Tokenizes (in this thread, no session). FileNotFoundError when a file's bytes are gone."""
    cfg, kind = p.cfg, TrainingKind(p.cfg.training_type.type)
    fresh: dict[str, TokenCount] = {}
    t, v = _count(p.train, p, storage, fresh), _count(p.valid, p, storage, fresh)
    per_epoch = _steps(cfg, t.packed_rows if cfg.packing else t.examples, 1)
    mem, shape = memory_estimate(cfg, t)
    work = eta.Work(
        model=cfg.base_model, kind=kind, train_tokens=t.tokens, validation_tokens=v.tokens,
        validation_examples=v.examples, steps_per_epoch=per_epoch, n_epochs=cfg.n_epochs,
        max_steps=cfg.max_steps, eval_every_steps=cfg.eval_every_steps,
        checkpoint_every_steps=cfg.checkpoint_every_steps, params=shape.params if shape else None,
        trainable_params=shape.trainable if shape else None, generates=p.generates,
        dpo=cfg.method is Method.dpo, built=shape is not None, cold=p.cold,
        world=_world(cfg), sharded=cfg.resources.strategy == "fsdp",
    )
    c = eta.counts(work)
    settings = get_settings()
    speeds = eta.speeds_for(cfg.base_model, work.params)
    table_tps = speeds.train_tokens_per_second[kind]
    threads = eta.thread_factor(settings.torch_threads, settings.device)
    load = host_load_factor(settings.embedded, settings.device)
    tps = p.measured_tps or table_tps * threads * load
    speedup = p.measured_tps / table_tps if p.measured_tps else threads * load
    d = eta.durations(work, c, speeds, tps, speedup, p.queue_seconds, fixed_speedup=load)
    out = EstimateOut(
        model=cfg.base_model, task=str(cfg.task), training_type=kind.value, train_tokens=t.tokens,
        validation_tokens=v.tokens, examples=t.examples, validation_examples=v.examples,
        n_epochs=cfg.n_epochs, batch_size=cfg.batch_size, steps=c.steps, trained_tokens=round(t.tokens * c.epochs),
        tokens_per_second=round(tps, 1), estimated_seconds=round(d.total, 1),
        queue_seconds=round(d.queue, 1), run_seconds=round(d.run, 1),
        breakdown=BreakdownOut.model_validate(d.as_dict()),
        counts=CountsOut(evaluations=c.evaluations, checkpoints=c.checkpoints, checkpoint_bytes=c.checkpoint_bytes,
                         speedup=round(speedup, 3), load_factor=round(load, 3)),
        basis="measured" if p.measured_tps else "default", sampled=t.sampled or v.sampled,
        packed_rows=t.packed_rows if cfg.packing else None, memory=mem,
    )
    return Result(out, fresh)


# --- memory ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Size:
    params: int
    trainable: int


def memory_estimate(cfg: RecipeConfig, t: TokenCount) -> tuple[MemoryOut | None, Size | None]:
    """The memory prediction and the parameter counts; (None, None) until the model's weights exist."""
    settings = get_settings()
    spec = get_spec(cfg.base_model)
    shape = memory.shape_from_dir(tokenizer_dir(spec, settings.data_dir))  # the model dir, once it is built
    if shape is None:
        return None, None
    device_bytes = settings.worker_device_memory_bytes
    est = memory.plan(shape, _workload(cfg, t, spec.lora_target_modules, settings.device),
                      cfg.gradient_checkpointing, device_bytes)
    return MemoryOut.model_validate(est.as_dict(device_bytes)), Size(shape.params, est.trainable_params)


def _world(cfg: RecipeConfig) -> int:
    return cfg.resources.devices * cfg.resources.nodes


def _workload(cfg: RecipeConfig, t: TokenCount, default_targets: list[str], device_setting: str) -> memory.Workload:
    tt = cfg.training_type
    device = "cpu" if device_setting == "cpu" else "cuda"
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    return memory.Workload(
        Task(cfg.task), TrainingKind(tt.type), rows=cfg.batch_size, seq_len=_seq_len(cfg, t), precision=precision,
        device=device, lora_r=tt.lora_r, lora_targets=tuple(tt.lora_target_modules or default_targets),
        virtual_tokens=tt.num_virtual_tokens if tt.type is TrainingKind.prompt_tuning else 0,
        world=_world(cfg), sharded=cfg.resources.strategy == "fsdp",
    )


def _seq_len(cfg: RecipeConfig, t: TokenCount) -> int:
    """Tokens per row of the job's largest micro-batch: packed rows fill up to max_seq_length; padded
    batches pad to the longest example (length grouping puts the longest ones together)."""
    max_len = effective_max_len(cfg)
    if cfg.packing:
        return max(1, min(max_len, t.tokens))
    return max_len if t.sampled or not t.longest else t.longest  # a sample may miss the longest


def store_counts(session: Session, p: Plan, fresh: dict[str, TokenCount]) -> None:
    """Cache counts made by `compute`, unless the file changed since the plan read it."""
    for file_id, count in fresh.items():
        planned = p.train if p.train.id == file_id else p.valid
        file = session.get(File, file_id)
        if file is not None and planned is not None and file.sha256 == planned.sha256:
            _store(file, p.cfg, count)
