"""Fine-tuning job shapes: the OpenAI request/response plus additive extensions."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.jobs.state import ExportStatus
from ml.config import Precision, Task, TrainingKind
from ml.data.cleaning import CleaningIn

Auto = Literal["auto"]
SUFFIX_PATTERN = r"^[A-Za-z0-9_-]{1,40}$"


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Auto = Field("auto", description="1..50 or auto")
    batch_size: int | Auto = "auto"
    learning_rate_multiplier: float | Auto = "auto"

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 50:
            raise ValueError("must be between 1 and 50")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 1024:
            raise ValueError("must be between 1 and 1024")
        return v

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _lrm(cls, v: float | str) -> float | str:
        if isinstance(v, float | int) and not 0 < v <= 100:
            raise ValueError("must be > 0 and <= 100")
        return v


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised"] = Field(description="only 'supervised' is supported")
    supervised: SupervisedMethod | None = None


class TrainingTypeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: TrainingKind = TrainingKind.lora
    lora_r: int = Field(8, ge=1, le=512)
    lora_alpha: int = Field(16, ge=1, le=4096)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    lora_target_modules: list[str] | None = Field(None, min_length=1)
    num_virtual_tokens: int = Field(16, ge=1, le=512)

    @field_validator("lora_target_modules")
    @classmethod
    def _targets(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not m.strip() for m in v):
            raise ValueError("module names must be non-empty strings")
        return v


class EarlyStoppingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    patience: int = Field(3, ge=1, le=100)
    min_delta: float = Field(0.0, ge=0.0)


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    suffix: str | None = Field(None, pattern=SUFFIX_PATTERN)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    # --- tunehouse extensions (additive) ---
    task: Task = Task.causal_lm
    training_type: TrainingTypeIn | TrainingKind | None = None
    learning_rate: float | None = Field(None, gt=0, le=1)
    max_seq_length: int | None = Field(None, ge=8, le=32768)
    warmup_ratio: float = Field(0.0, ge=0, le=0.5)
    weight_decay: float = Field(0.0, ge=0, le=1)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="stop after this many optimizer steps")
    max_train_seconds: int | None = Field(None, ge=1, le=30 * 24 * 3600,
                                          description="stop once training has run this long")
    checkpoint_every_steps: int = Field(0, ge=0)
    eval_every_steps: int = Field(0, ge=0)
    early_stopping: EarlyStoppingIn | None = None
    from_checkpoint: str | None = None
    cleaning: CleaningIn | None = None
    # checked (scheme, public address, signing secret) by app.webhooks.service.validate_webhook_url
    webhook_url: str | None = Field(None, max_length=2048)
    # memory and speed (README "Memory and speed")
    precision: Precision = Field("auto", description="auto: bf16 (fp16 + loss scaling without bf16) on CUDA, "
                                                     "fp32 on CPU; fp16 needs a CUDA worker")
    gradient_checkpointing: bool | Auto = Field("auto", description="auto: on when the activations would "
                                                                    "not fit the worker's device otherwise")
    packing: bool = Field(False, description="causal_lm: pack several examples per row (batch_size counts rows)")

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None:
            if len(v) > 16:
                raise ValueError("at most 16 keys")
            if any(len(k) > 64 or len(val) > 512 for k, val in v.items()):
                raise ValueError("keys are at most 64 and values at most 512 characters")
        return v

    def training_type_config(self) -> TrainingTypeIn:
        if isinstance(self.training_type, TrainingKind):
            return TrainingTypeIn(type=self.training_type)
        return self.training_type or TrainingTypeIn()


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobOut(BaseModel):
    """OpenAI `fine_tuning.job` plus extensions (task, training_type, attempt, progress...)."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: str
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    training_file: str
    validation_file: str | None
    result_files: list[str]
    trained_tokens: int | None
    error: JobError | None
    seed: int
    suffix: str | None = None
    user_provided_suffix: str | None = None
    estimated_finish: int | None
    integrations: list[dict[str, Any]] = []
    metadata: dict[str, str] | None
    # extensions
    task: str
    training_type: dict[str, Any]
    config: dict[str, Any]
    attempt: int
    max_attempts: int
    queue_position: int | None = None
    progress: dict[str, Any] = {}
    evaluation: dict[str, Any] | None = None
    started_at: int | None = None


class EventOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    data: dict[str, Any] | None
    type: str


class CheckpointOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]
    # extensions
    epoch: float
    is_best: bool


class ExportOut(BaseModel):
    """Extension: the 202 of a merged / full download while a worker builds it (`app.jobs.exports`)."""

    id: str
    object: Literal["fine_tuning.export"] = "fine_tuning.export"
    status: ExportStatus
    format: str  # as asked: a LoRA's `full` model is its merged model
    fine_tuning_job_id: str
    checkpoint: str  # a checkpoint id or "final"
    created_at: int
    updated_at: int
    error: dict[str, Any] | None = None
