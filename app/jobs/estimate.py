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

Speed: the mean `tokens_per_second` of the training metrics events of the most recent succeeded
jobs with the same base model and training type ("measured"), else a default table ("default",
measured on a 2-core CPU box: a GPU is much faster, so the first succeeded job fixes the basis).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.jobs.state import JobStatus
from app.kit.storage import Storage
from app.models_registry.catalog import get_spec
from app.orm import File, Job, JobEvent
from app.settings import get_settings
from ml import memory
from ml.config import RecipeConfig, Task, TrainingKind
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
EVAL_COST = 1 / 3  # a validation token costs a forward pass, about a third of a training token
STARTUP_SECONDS = 5.0  # loading the model and data, saving the final model
# Training tokens/s measured on a 2-core CPU (torch 2.13, fp32), per base model and training type.
DEFAULT_TOKENS_PER_SECOND: dict[tuple[str, TrainingKind], float] = {
    ("tiny-lm", TrainingKind.full): 20_000.0, ("tiny-lm", TrainingKind.lora): 20_000.0,
    ("tiny-lm", TrainingKind.freeze): 38_000.0, ("tiny-lm", TrainingKind.prompt_tuning): 20_000.0,
    ("minilm-l6", TrainingKind.full): 300.0, ("minilm-l6", TrainingKind.lora): 1_400.0,
    ("minilm-l6", TrainingKind.freeze): 2_200.0, ("minilm-l6", TrainingKind.prompt_tuning): 1_200.0,
}
# Other models: minilm-l6's full fine-tuning speed, scaled by its measured per-type ratios (the
# optimizer step over every weight dominates full fine-tuning on a CPU).
FALLBACK_FULL_TOKENS_PER_SECOND = 300.0
KIND_SPEED = {TrainingKind.full: 1.0, TrainingKind.lora: 4.7, TrainingKind.freeze: 7.3,
              TrainingKind.prompt_tuning: 4.0,
              TrainingKind.qlora: 3.1}  # LoRA less 4-bit dequantization (about a third slower: not measured here)

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
    estimated_seconds: float = Field(description="Predicted training time.")
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
    known = DEFAULT_TOKENS_PER_SECOND.get((model, kind))
    return known if known is not None else FALLBACK_FULL_TOKENS_PER_SECOND * KIND_SPEED[kind]


def _steps(cfg: RecipeConfig, examples: int) -> int:
    micro = math.ceil(examples / cfg.batch_size)
    return math.ceil(micro / max(1, cfg.gradient_accumulation_steps)) * cfg.n_epochs


def _evaluations(cfg: RecipeConfig, steps: int, has_validation: bool) -> int:
    if not has_validation:
        return 0
    return math.ceil(steps / cfg.eval_every_steps) if cfg.eval_every_steps > 0 else cfg.n_epochs


@dataclass(frozen=True)
class Plan:
    """What an estimate needs from the database; `compute` needs no session."""

    cfg: RecipeConfig
    train: StoredFile
    valid: StoredFile | None
    measured_tps: float | None
    limit: int  # rows counted exactly before sampling


@dataclass(frozen=True)
class Result:
    out: EstimateOut
    fresh: dict[str, TokenCount]  # file id -> counts made now (not from the cache)


def plan(session: Session, cfg: RecipeConfig, train: File, valid: File | None, *,
         limit: int | None = None) -> Plan:
    """Reads only. `limit` defaults to FULL_COUNT_ROWS."""
    kind = TrainingKind(cfg.training_type.type)
    return Plan(cfg, StoredFile.of(train, cfg), StoredFile.of(valid, cfg) if valid else None,
                measured_tokens_per_second(session, cfg.base_model, kind.value), limit or FULL_COUNT_ROWS)


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
    steps = _steps(cfg, t.packed_rows if cfg.packing else t.examples)
    tps = p.measured_tps or default_tokens_per_second(cfg.base_model, kind)
    work = t.tokens * cfg.n_epochs + EVAL_COST * v.tokens * _evaluations(cfg, steps, p.valid is not None)
    out = EstimateOut(
        model=cfg.base_model, task=str(cfg.task), training_type=kind.value, train_tokens=t.tokens,
        validation_tokens=v.tokens, examples=t.examples, validation_examples=v.examples,
        n_epochs=cfg.n_epochs, batch_size=cfg.batch_size, steps=steps, trained_tokens=t.tokens * cfg.n_epochs,
        tokens_per_second=round(tps, 1), estimated_seconds=round(STARTUP_SECONDS + work / tps, 1),
        basis="measured" if p.measured_tps else "default", sampled=t.sampled or v.sampled,
        packed_rows=t.packed_rows if cfg.packing else None, memory=memory_estimate(cfg, t),
    )
    return Result(out, fresh)


# --- memory ----------------------------------------------------------------------------------------

def memory_estimate(cfg: RecipeConfig, t: TokenCount) -> MemoryOut | None:
    settings = get_settings()
    spec = get_spec(cfg.base_model)
    shape = memory.shape_from_dir(tokenizer_dir(spec, settings.data_dir))  # the model dir, once it is built
    if shape is None:
        return None
    device_bytes = settings.worker_device_memory_bytes
    est = memory.plan(shape, _workload(cfg, t, spec.lora_target_modules, settings.device),
                      cfg.gradient_checkpointing, device_bytes)
    return MemoryOut.model_validate(est.as_dict(device_bytes))


def _workload(cfg: RecipeConfig, t: TokenCount, default_targets: list[str], device_setting: str) -> memory.Workload:
    tt = cfg.training_type
    device = "cpu" if device_setting == "cpu" else "cuda"
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    return memory.Workload(
        Task(cfg.task), TrainingKind(tt.type), rows=cfg.batch_size, seq_len=_seq_len(cfg, t), precision=precision,
        device=device, lora_r=tt.lora_r, lora_targets=tuple(tt.lora_target_modules or default_targets),
        virtual_tokens=tt.num_virtual_tokens if tt.type is TrainingKind.prompt_tuning else 0,
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
