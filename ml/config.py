"""The contract between the job runner (claims, leases, events, checkpoint registry) and the
training recipes (setup / train / save_checkpoint / cleanup): typed configs, hooks, outcomes.
Torch-free, so the API validates and stores `RecipeConfig` on the job row. The checkpoint format the
recipes write is `ml.checkpoint`."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from ml.checkpoint import CheckpointInfo
    from ml.models.base import LocalBase



class Task(StrEnum):
    causal_lm = "causal_lm"
    classification = "classification"
    regression = "regression"
    masked_lm = "masked_lm"


class TrainingKind(StrEnum):
    lora = "lora"
    full = "full"
    freeze = "freeze"
    prompt_tuning = "prompt_tuning"
    qlora = "qlora"  # LoRA on a 4-bit (NF4) base: CUDA workers with bitsandbytes only


class Method(StrEnum):
    """OpenAI's fine-tuning `method.type` (reinforcement is not supported)."""

    supervised = "supervised"
    dpo = "dpo"  # preference pairs, `ml.training.dpo`


DEFAULT_DPO_BETA = 0.1  # what `beta: "auto"` resolves to

LORA_KINDS = (TrainingKind.lora, TrainingKind.qlora)
Precision = Literal["auto", "fp32", "bf16", "fp16"]


class TrainingTypeConfig(BaseModel):
    type: TrainingKind = TrainingKind.lora
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None  # None -> the catalog's default for the base model
    num_virtual_tokens: int = 16  # prompt tuning


class EarlyStopping(BaseModel):
    patience: int = 3
    min_delta: float = 0.0
    metric: str = "valid_loss"


class Resources(BaseModel):
    """What one attempt runs on: `devices` processes (one per GPU, or CPU processes over gloo) on
    `nodes` machines. `auto` is data parallel (DDP) when devices > 1."""

    devices: int = Field(1, ge=1)
    nodes: int = Field(1, ge=1)
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"


class RecipeConfig(BaseModel):
    """Fully resolved training config, stored on the job row (`jobs.config`)."""

    base_model: str
    task: Task
    training_type: TrainingTypeConfig
    seed: int
    n_epochs: int
    batch_size: int
    learning_rate: float
    max_seq_length: int
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    gradient_accumulation_steps: int = 1
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = 1.0
    max_steps: int | None = None  # stop (successfully) after this many optimizer steps; the LR schedule fits it
    max_train_seconds: float | None = None  # stop (successfully) once training has run this long
    training_file_key: str  # storage key of the training data
    training_file_kind: str = "jsonl"  # jsonl | csv
    validation_file_key: str | None = None
    validation_file_kind: str = "jsonl"
    checkpoint_every_steps: int = 0  # 0 -> once per epoch
    eval_every_steps: int = 0  # 0 -> once per epoch (when there is a validation file)
    log_every_steps: int = 1
    early_stopping: EarlyStopping | None = None
    init_checkpoint_key: str | None = None  # from_checkpoint: start from these weights
    cleaning: dict[str, Any] = Field(default_factory=dict)
    # Memory and speed. The defaults are the behaviour of rows stored before these fields existed.
    precision: Precision = "auto"  # auto: bf16 (fp16 + loss scaling without bf16) on CUDA, fp32 elsewhere
    gradient_checkpointing: bool | Literal["auto"] = False  # auto: on when the activations would not fit
    packing: bool = False  # causal_lm: several examples per row; `batch_size` then counts rows
    compile: bool | Literal["auto"] = False  # torch.compile the training forward (`ml.training.compiled`)
    # Preference tuning: `batch_size` then counts pairs; `beta` scales the DPO loss's implicit reward.
    method: Method = Method.supervised
    beta: float = DEFAULT_DPO_BETA
    resources: Resources = Field(default_factory=Resources)  # > 1 device: `ml.training.launch` under torchrun


class Interrupt(StrEnum):
    cancelled = "cancelled"
    paused = "paused"
    lease_lost = "lease_lost"


EventLevel = Literal["info", "warn", "error"]  # as OpenAI's fine-tuning events


class Hooks(Protocol):
    """Implemented by the runner; called by recipes from the training thread."""

    def message(self, text: str, level: EventLevel = "info", data: dict[str, Any] | None = None) -> None: ...

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Per-step (train_loss, lr, tokens_per_second, epoch) or per-eval (valid_loss, accuracy, ...)."""

    def progress(self, step: int, total_steps: int, epoch: float, trained_tokens: int) -> None: ...

    def interrupted(self) -> Interrupt | None:
        """Cheap; call every step. Non-None -> save state if you can and return promptly."""

    def checkpoint(self, local_dir: Path, info: CheckpointInfo) -> None:
        """Takes ownership of `local_dir` (moves it into storage atomically, registers the row)."""


@dataclass
class TrainOutcome:
    completed: bool
    interrupt: Interrupt | None = None
    step: int = 0
    trained_tokens: int = 0
    final_metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False


class Recipe(Protocol):
    def setup(self) -> None: ...
    def train(self) -> TrainOutcome: ...
    def save_checkpoint(self, local_dir: Path, with_state: bool = True) -> CheckpointInfo: ...
    def cleanup(self) -> None: ...


class RecipeFactory(Protocol):
    """`ml.training.build_recipe` has this signature."""

    def __call__(
        self,
        cfg: RecipeConfig,
        hooks: Hooks,
        *,
        workdir: Path,  # scratch space for this attempt (deleted after)
        train_path: Path,  # local copy of the training file
        valid_path: Path | None,
        resume_dir: Path | None,  # a checkpoint dir with training_state/ to resume from
        init_dir: Path | None,  # from_checkpoint: weights to start from (no training state)
        base: LocalBase,  # the catalog base model and its local directory
        device: str = "auto",
    ) -> Recipe: ...
