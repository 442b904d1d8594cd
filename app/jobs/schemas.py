"""Fine-tuning job shapes: the OpenAI request/response plus additive extensions."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.jobs.state import ExportStatus
from ml.config import Precision, Task, TrainingKind
from ml.data.cleaning import CleaningIn

Auto = Literal["auto"]
SUFFIX_PATTERN = r"^[A-Za-z0-9_-]{1,40}$"
MAX_EVERY_STEPS = 1_000_000  # checkpoint / eval cadence; past any real job's length (0 = once per epoch)


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Auto = Field("auto", description="1..50 or auto")
    batch_size: int | Auto = Field(
        "auto", description="Examples per optimizer step (1..1024) or auto (about 0.2% of the examples, 4..32).")
    learning_rate_multiplier: float | Auto = Field(
        "auto", description="Scales the base model's default learning rate (0..100] or auto (1).")

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


class DpoHyperparameters(Hyperparameters):
    beta: float | Auto = Field("auto", description="DPO's KL weight: higher keeps the model closer to the "
                                                   "reference; auto = 0.1")

    @field_validator("beta")
    @classmethod
    def _beta(cls, v: float | str) -> float | str:
        if isinstance(v, float | int) and not 0 < v <= 10:
            raise ValueError("must be > 0 and <= 10")
        return v


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = Field(None, description="Hyperparameters of supervised fine-tuning.")


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters | None = Field(
        None, description="Hyperparameters of DPO (preference) fine-tuning.")


class Method(BaseModel):
    """OpenAI's `method`: the type and its settings under the key of the same name."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "reinforcement"] = Field(
        description="supervised or dpo (reinforcement is not supported)")
    supervised: SupervisedMethod | None = Field(None, description="Settings of method type `supervised`.")
    dpo: DpoMethod | None = Field(None, description="Settings of method type `dpo`.")
    reinforcement: dict[str, Any] | None = Field(
        None, description="Accepted in shape only: reinforcement fine-tuning is refused with a 400.")

    def settings(self) -> SupervisedMethod | DpoMethod | dict[str, Any] | None:
        return {"supervised": self.supervised, "dpo": self.dpo, "reinforcement": self.reinforcement}[self.type]


class TrainingTypeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: TrainingKind = Field(
        TrainingKind.lora, description="lora, qlora, full, freeze (train the head only) or prompt_tuning.")
    lora_r: int = Field(8, ge=1, le=512, description="LoRA rank.")
    lora_alpha: int = Field(
        16, ge=1, le=4096, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] | None = Field(
        None, min_length=1, description="Module names to adapt; null: the base model's defaults.")
    num_virtual_tokens: int = Field(
        16, ge=1, le=512, description="prompt_tuning: learned virtual tokens prepended to every input.")

    @field_validator("lora_target_modules")
    @classmethod
    def _targets(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not m.strip() for m in v):
            raise ValueError("module names must be non-empty strings")
        return v


class ResourcesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    devices: int = Field(1, ge=1, le=1024, description="Training processes: one per GPU (CPU: gloo processes); "
                                                      "at most what a worker advertises (TUNEHOUSE_WORKER_DEVICES).")
    nodes: int = Field(1, ge=1, le=1024, description="Machines (workers), each running `devices` processes.")
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="auto or ddp: data parallel (every device holds the whole model); fsdp: "
                            "fully sharded data parallel (each device holds 1/N of the weights, gradients and "
                            "optimizer state), for full and freeze fine-tunes in bf16 or fp32.")


class EarlyStoppingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    patience: int = Field(3, ge=1, le=100, description="Evaluations without improvement before training stops.")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest drop in validation loss that counts as an improvement.")


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "model": "smollm2-135m", "training_file": "file-abc123", "validation_file": "file-def456",
        "hyperparameters": {"n_epochs": 1, "batch_size": 4}, "seed": 1, "suffix": "qa-json",
        "training_type": "lora", "learning_rate": 2e-3, "metadata": {"team": "search"},
    }]})

    model: str = Field(
        min_length=1, max_length=256,
        description="Base model id (GET /v1/models), e.g. `smollm2-135m`, `minilm-l6`, `tiny-lm`.")
    training_file: str = Field(min_length=1, description="Id of an uploaded fine-tune file.")
    validation_file: str | None = Field(
        None, description="Id of an uploaded fine-tune file to evaluate on (metrics, evaluation report).")
    suffix: str | None = Field(
        None, pattern=SUFFIX_PATTERN,
        description="Up to 40 characters (letters, digits, - and _) added to the fine-tuned model's name.")
    seed: int | None = Field(
        None, ge=0, le=2**31 - 1, description="Seed for data order and initialisation; random when omitted.")
    hyperparameters: Hyperparameters | None = Field(
        None, description="n_epochs, batch_size, learning_rate_multiplier (the supervised shorthand).")
    method: Method | None = Field(None, description="OpenAI's method: `supervised` or `dpo`, with its hyperparameters.")
    integrations: list[dict[str, Any]] | None = Field(
        None, description="Not supported: a non-empty list is refused (400 unsupported_integration).")
    metadata: dict[str, str] | None = Field(
        None, description="Up to 16 string pairs (keys up to 64, values up to 512 characters); filter lists with it.")
    # --- tunehouse extensions (additive) ---
    task: Task = Field(Task.causal_lm, description="Extension: causal_lm, classification, regression or masked_lm.")
    training_type: TrainingTypeIn | TrainingKind | None = Field(
        None, description="Extension: lora (default), qlora, full, freeze or prompt_tuning, bare or with options.")
    learning_rate: float | None = Field(
        None, gt=0, le=1, description="Extension: absolute learning rate (instead of learning_rate_multiplier).")
    max_seq_length: int | None = Field(
        None, ge=8, le=32768,
        description="Extension: truncate examples to this many tokens; default: the model's maximum.")
    warmup_ratio: float = Field(
        0.0, ge=0, le=0.5, description="Extension: share of the steps spent warming the learning rate up.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="Extension: AdamW weight decay.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1024, description="Extension: batches accumulated per optimizer step.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Extension: learning-rate schedule after warm-up.")
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="stop after this many optimizer steps")
    max_train_seconds: int | None = Field(None, ge=1, le=30 * 24 * 3600,
                                          description="stop once training has run this long")
    checkpoint_every_steps: int = Field(
        0, ge=0, le=MAX_EVERY_STEPS, description="Extension: checkpoint cadence in steps; 0: once per epoch.")
    eval_every_steps: int = Field(
        0, ge=0, le=MAX_EVERY_STEPS, description="Extension: validation cadence in steps; 0: once per epoch.")
    early_stopping: EarlyStoppingIn | None = Field(
        None, description="Extension: stop when validation loss stops improving (needs validation_file).")
    from_checkpoint: str | None = Field(
        None, description="Extension: a checkpoint id or name of the project to start from.")
    cleaning: CleaningIn | None = Field(
        None, description="Extension: clean the data before training (dedupe, PII scrubbing...).")
    # checked (scheme, public address, signing secret) by app.webhooks.service.validate_webhook_url
    webhook_url: str | None = Field(
        None, max_length=2048,
        description="Extension: https URL POSTed (signed) when the job succeeds, fails or is cancelled.")
    # memory and speed (README "Memory and speed")
    precision: Precision = Field("auto", description="auto: bf16 (fp16 + loss scaling without bf16) on CUDA, "
                                                     "fp32 on CPU; fp16 needs a CUDA worker")
    gradient_checkpointing: bool | Auto = Field("auto", description="auto: on when the activations would "
                                                                    "not fit the worker's device otherwise")
    packing: bool = Field(False, description="causal_lm: pack several examples per row (batch_size counts rows)")
    compile: bool | Auto = Field("auto", description="torch.compile the training forward (fused AdamW either way); "
                                                    "auto: only where bench/train_compile.py measured it to "
                                                    "pay, compile time included (not on CPU workers)")
    resources: ResourcesIn | None = Field(
        None, description="Extension: devices per node and nodes one attempt trains on; batch_size stays the "
                          "global batch, split between the devices.")

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
    code: str = Field(description="Machine-readable error code.")
    message: str = Field(description="What went wrong.")
    param: str | None = Field(None, description="The offending parameter, if any.")


class JobOut(BaseModel):
    """OpenAI `fine_tuning.job` plus extensions (task, training_type, attempt, progress...)."""

    id: str = Field(description="The job id (`ftjob-...`).")
    object: Literal["fine_tuning.job"] = Field("fine_tuning.job", description="Always `fine_tuning.job`.")
    created_at: int = Field(description="Creation time (Unix seconds).")
    finished_at: int | None = Field(description="When the job reached a final status; null before.")
    model: str = Field(description="The base model.")
    fine_tuned_model: str | None = Field(description="The resulting model's id once the job succeeded; null before.")
    organization_id: str = Field(description="The project's id.")
    status: str = Field(description="validating_files, queued, running, paused, succeeded, failed or cancelled.")
    hyperparameters: dict[str, Any] = Field(
        description="The hyperparameters in force (`auto` resolved once training starts).")
    method: dict[str, Any] = Field(description="The method and its hyperparameters.")
    training_file: str = Field(description="The training file's id.")
    validation_file: str | None = Field(description="The validation file's id.")
    result_files: list[str] = Field(description="Result files (a CSV of step metrics) once the job finished.")
    trained_tokens: int | None = Field(description="Tokens trained on (all epochs) once the job succeeded.")
    error: JobError | None = Field(description="Why the job failed; null otherwise.")
    seed: int = Field(description="The seed used.")
    suffix: str | None = Field(None, description="The suffix of the fine-tuned model's name.")
    user_provided_suffix: str | None = Field(None, description="The suffix as given at creation.")
    estimated_finish: int | None = Field(description="Predicted finish time (Unix seconds) while queued or running.")
    integrations: list[dict[str, Any]] = Field([], description="Always empty: integrations are not supported.")
    metadata: dict[str, str] | None = Field(description="The metadata given at creation.")
    # extensions
    task: str = Field(description="Extension: the training task.")
    training_type: dict[str, Any] = Field(description="Extension: the training type and its options.")
    config: dict[str, Any] = Field(description="Extension: the full resolved training configuration.")
    attempt: int = Field(
        description="Extension: attempts started (a worker lost mid-job is retried from its last checkpoint).")
    max_attempts: int = Field(description="Extension: attempts allowed before the job fails with worker_lost.")
    queue_position: int | None = Field(None, description="Extension: jobs ahead of this one while queued.")
    progress: dict[str, Any] = Field(
        {}, description="Extension: step, total_steps, epoch, latest losses, tokens/s and ETA while running; "
        "`launch` says how the attempt runs (world_size, nodes, strategy, backend, device).")
    evaluation: dict[str, Any] | None = Field(
        None, description="Extension: the evaluation report (base vs fine-tuned) when a validation file was given.")
    started_at: int | None = Field(None, description="Extension: when training first started (Unix seconds).")
    resources: dict[str, Any] = Field(
        {"devices": 1, "nodes": 1, "strategy": "auto"},
        description="Extension: devices, nodes and strategy the job trains with.")


class EventOut(BaseModel):
    id: str = Field(description="The event id (`ftevent-...`).")
    object: Literal["fine_tuning.job.event"] = Field(
        "fine_tuning.job.event", description="Always `fine_tuning.job.event`.")
    created_at: int = Field(description="When it happened (Unix seconds).")
    level: str = Field(description="info, warn or error.")
    message: str = Field(description="Human-readable message.")
    data: dict[str, Any] | None = Field(description="Structured payload (e.g. step metrics for `metrics` events).")
    type: str = Field(description="`message` or `metrics`.")


class CheckpointOut(BaseModel):
    id: str = Field(description="The checkpoint id (`ftckpt-...`), servable as a model.")
    object: Literal["fine_tuning.job.checkpoint"] = Field(
        "fine_tuning.job.checkpoint", description="Always `fine_tuning.job.checkpoint`.")
    created_at: int = Field(description="When it was saved (Unix seconds).")
    fine_tuned_model_checkpoint: str = Field(description="The checkpoint's model name (`ft:...:ckpt-step-N`).")
    fine_tuning_job_id: str = Field(description="The job that saved it.")
    step_number: int = Field(description="Optimizer step it was saved at.")
    metrics: dict[str, Any] = Field(description="Training and validation metrics at that step.")
    # extensions
    epoch: float = Field(description="Extension: epoch (fractional) it was saved at.")
    is_best: bool = Field(description="Extension: lowest validation (else training) loss of the job's checkpoints.")


class ExportOut(BaseModel):
    """Extension: the 202 of a merged / full download while a worker builds it (`app.jobs.exports`)."""

    id: str = Field(description="The export id.")
    object: Literal["fine_tuning.export"] = Field("fine_tuning.export", description="Always `fine_tuning.export`.")
    status: ExportStatus = Field(description="queued, building, ready or failed.")
    format: str = Field(description="The format asked for (a LoRA's `full` model is its merged model).")
    fine_tuning_job_id: str = Field(description="The job whose weights are exported.")
    checkpoint: str = Field(description="A checkpoint id, or `final`.")
    created_at: int = Field(description="When the export was asked for (Unix seconds).")
    updated_at: int = Field(description="Last status change (Unix seconds).")
    error: dict[str, Any] | None = Field(None, description="Why the export failed, in the OpenAI error shape.")
