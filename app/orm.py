"""All ORM models, in one module so Alembic's autogenerate sees every table."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.files.status import FileStatus
from app.kit.db import Base, JSONType, UTCDateTime, utcnow


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Operator limits (app.tenancy): NULL -> the settings default, 0 -> unlimited.
    rpm_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_queued_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_running_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)  # read by the job claim
    max_storage_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    max_file_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class ProjectUsage(Base):
    """Cumulative metered usage, one row per project, bumped atomically by `app.tenancy.service`."""

    __tablename__ = "project_usage"

    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    trained_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    device_seconds: Mapped[float] = mapped_column(Float, default=0.0)  # training wall time x devices
    predictions: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_served: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    # sha256 of the full key; the key itself is shown once and never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    project: Mapped[Project] = relationship()


class File(Base):
    __tablename__ = "files"
    # Keyset pages (app.kit.pagination) seek on (scope, order column, id): flat however deep.
    __table_args__ = (Index("ix_files_project_created_id", "project_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(512))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[FileStatus] = mapped_column(String(16), default=FileStatus.processed)
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    format: Mapped[str | None] = mapped_column(String(32), nullable=True)  # chat|prompt_completion|text|...
    rows: Mapped[int] = mapped_column(Integer, default=0)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    storage_key: Mapped[str] = mapped_column(String(512))
    # Detected columns, label names/counts, value stats, cleaning report.
    stats: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("project_id", "idempotency_key", name="uq_jobs_project_idempotency"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        Index("ix_jobs_project_created_id", "project_id", "created_at", "id"),  # list pages
        Index("ix_jobs_status_created", "status", "created_at"),  # the queue, queue positions
        Index("ix_jobs_project_status", "project_id", "status"),  # quota and running-job counts
        Index("ix_jobs_status_devices", "status", "devices"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(256))  # base model id from the catalog (or ft: model)
    training_file: Mapped[str] = mapped_column(ForeignKey("files.id"))
    validation_file: Mapped[str | None] = mapped_column(ForeignKey("files.id"), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    task: Mapped[str] = mapped_column(String(32))
    training_type: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # What the user asked for ("auto" kept) and the typed recipe config resolved from it.
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSONType)
    config: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    status: Mapped[str] = mapped_column(String(32))  # app.jobs.state.JobStatus
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    result_files: Mapped[list[str]] = mapped_column(JSONType, default=list)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    user_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSONType, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(256), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    webhook_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    progress: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)  # step, total_steps, epoch...
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    estimated_finish: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    # Durability: claimed by a conditional update, held by a lease renewed by heartbeat.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(256), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # resources.devices / resources.nodes, copied from the config: a worker claims only jobs whose
    # devices per node it holds (`app.jobs.queue`); nodes > 1 runs as a gang (`app.jobs.gang`).
    devices: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    nodes: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


class GangSeat(Base):
    """A follower's place in a multi-node attempt (`app.jobs.gang`): the leader opens `nodes - 1` seats
    with the rendezvous, a follower takes one by a conditional update and heartbeats it; `go` is set by
    the leader once every seat is taken. Rows of an attempt that ended are deleted."""

    __tablename__ = "gang_seats"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(256))  # host:port of node 0's rendezvous store
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)  # nodes, devices, resume_key, leader
    worker_id: Mapped[str | None] = mapped_column(String(256), nullable=True, index=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    go: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_seq", "job_id", "seq"),)

    # Monotonic per database: orders events and drives SSE resume (Last-Event-ID).
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                     autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    level: Mapped[str] = mapped_column(String(8), default="info")  # info | warn | error
    type: Mapped[str] = mapped_column(String(16), default="message")  # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_checkpoints_job_step"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[float] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    storage_key: Mapped[str] = mapped_column(String(512))
    fine_tuned_model_checkpoint: Mapped[str] = mapped_column(String(512), index=True)
    is_best: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class FineTunedModel(Base):
    """The model registry: one row per servable fine-tuned model (final models)."""

    __tablename__ = "fine_tuned_models"
    __table_args__ = (Index("ix_fine_tuned_models_project_created", "project_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(512), primary_key=True)  # ft:<base>:<project>:<suffix>:<job>
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    base_model: Mapped[str] = mapped_column(String(256))
    task: Mapped[str] = mapped_column(String(32))
    training_type: Mapped[str] = mapped_column(String(32))
    storage_key: Mapped[str] = mapped_column(String(512))
    checkpoint_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    info: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)  # label names, metrics...
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Export(Base):
    """Weights that take model work to export (a LoRA merged into its base): built once by a worker
    (`app.jobs.exports`), kept in storage, streamed by the download endpoint."""

    __tablename__ = "exports"
    __table_args__ = (UniqueConstraint("job_id", "checkpoint", "format", name="uq_exports_job_checkpoint_format"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    checkpoint: Mapped[str] = mapped_column(String(64))  # a checkpoint id or "final"
    format: Mapped[str] = mapped_column(String(16))  # what is built: "merged"
    status: Mapped[str] = mapped_column(String(16))  # queued | building | ready | failed
    source_key: Mapped[str] = mapped_column(String(512))  # storage key of the checkpoint
    source_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the adapter it was built from
    storage_key: Mapped[str | None] = mapped_column(String(512), nullable=True)  # set when ready
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # bumped per build claim: a stale builder can't finish
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
