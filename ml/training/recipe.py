"""The training loop: a plain torch loop (AdamW, LR schedule with warmup, gradient accumulation and
clipping) implementing the `Recipe` contract of `ml.config`.

Resume is exact: batches are a pure function of (seed, epoch), a checkpoint records the position
inside the epoch, and optimizer / scheduler / RNG states are restored, so an interrupted-and-resumed
run ends with the same weights as an uninterrupted one. Interrupts are checked before every
micro-batch; a pause mid-accumulation drops the partial gradients and saves the state of the last
completed step (RNG included), which the resumed run redoes.

Budgets: `max_steps` caps the optimizer steps (the LR schedule is laid out over the capped run) and
`max_train_seconds` the time spent in the loop (kept across resumes); either ends the job like the last
epoch does: a final evaluation, a checkpoint, success.
"""

from __future__ import annotations

import math
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from ml import checkpoint, memory
from ml.checkpoint import CheckpointInfo, adapter_kind, has_info, is_adapter_dir, read_info, state_dir
from ml.config import (
    Hooks,
    Interrupt,
    Method,
    RecipeConfig,
    Task,
    TrainingKind,
    TrainOutcome,
)
from ml.data.packing import pack_rows, row_lengths
from ml.errors import InputError, TrainingDataError
from ml.evaluation import Batch, score, score_sums, task_metrics
from ml.modeling import (
    ADAPTER_KINDS,
    apply_qlora,
    apply_training_type,
    enable_gradient_checkpointing,
    forward_logits,
    forward_packed,
    load_adapter,
    load_quantized_model,
    load_task_model,
    load_tokenizer,
    pick_device,
    qlora_unavailable,
    trainable_parameters,
    upcast_trainable,
)
from ml.models.base import LocalBase
from ml.training import compiled, dpo
from ml.training import data as D
from ml.training.distributed import ConsolidatedOptimizer, World, full_model_state
from ml.training.losses import loss_sum
from ml.training.metrics import improved
from ml.training.packing import PACKED_KEY, PackedCollator, use_packed_attention
from ml.training.precision import Precision
from ml.training.state import RngState, capture_rng, load_state, restore_rng, save_state, seed_everything

PROBLEM_TYPES = {Task.classification: "single_label_classification", Task.regression: "regression"}
INTERRUPTS = [None, *Interrupt]  # broadcast between ranks by index


@dataclass
class Progress:
    """Everything the loop needs to continue exactly; saved as trainer_state.json."""

    step: int = 0
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    trained_tokens: int = 0
    best: float | None = None  # early stopping
    bad_evals: int = 0
    last_eval_step: int = -1
    last_ckpt_step: int = -1
    log_loss: float = 0.0  # sums over the current logging window
    log_steps: int = 0
    log_tokens: int = 0
    last_loss: float | None = None
    last_lr: float = 0.0
    eval_metrics: dict[str, float] = field(default_factory=dict)
    log_stats: dict[str, float] = field(default_factory=dict)  # DPO: per-pair stat sums of the window
    loop_seconds: float = 0.0  # wall time spent in `train()`, for `max_train_seconds`


@dataclass
class StepResult:
    loss: float
    tokens: int
    lr: float
    stats: dict[str, float] = field(default_factory=dict)  # DPO: per-pair stat sums (`dpo.StepStats`)
    rank_tokens: int = 0  # this rank's share of `tokens` (per-rank throughput in a group)


@dataclass
class Sources:
    weights: Path  # a full model directory: the base, a from_checkpoint model, or a resumed full checkpoint
    adapter: Path | None  # adapter checkpoint to load on top (resume / from_checkpoint)
    tokenizer: Path
    base_checkpoint: bool  # `weights` is a from_checkpoint model (adapters trained here need it as base)


def plan_sources(base_dir: Path, init_dir: Path | None, resume_dir: Path | None) -> Sources:
    init_full = init_dir if init_dir is not None and not is_adapter_dir(init_dir) else None
    weights = init_full or base_dir
    tokenizer = resume_dir or init_dir or base_dir
    if resume_dir is not None:
        if is_adapter_dir(resume_dir):
            return Sources(weights, resume_dir, tokenizer, init_full is not None)
        return Sources(resume_dir, None, tokenizer, False)
    adapter = init_dir if init_dir is not None and init_full is None else None
    return Sources(weights, adapter, tokenizer, init_full is not None)


def lr_lambda(kind: str, warmup: int, total: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


class TrainingRecipe:
    def __init__(
        self,
        cfg: RecipeConfig,
        hooks: Hooks,
        *,
        workdir: Path,
        train_path: Path,
        valid_path: Path | None,
        resume_dir: Path | None,
        init_dir: Path | None,
        base: LocalBase,
        device: str = "auto",
    ) -> None:
        self.cfg, self.hooks, self.workdir = cfg, hooks, Path(workdir)
        self.spec, self.base_dir, self.device_name = base.spec, base.path, device
        self.train_path, self.valid_path = train_path, valid_path
        self.resume_dir, self.init_dir = resume_dir, init_dir
        self.task = Task(cfg.task)
        self.kind = TrainingKind(cfg.training_type.type)
        self.progress = Progress()
        self.world = World.current(cfg.resources.strategy)  # one process unless `ml.training.launch` started a group
        self.dpo = dpo.Objective(cfg.beta) if cfg.method is Method.dpo else None
        self.train_set: list[Any] = []  # `D.Example`s, or DPO's `D.Pair`s
        self.valid_set: list[Any] = []
        self.collator: D.Collator | dpo.PairCollator
        self.label_names: list[str] | None = None
        self._step_rng: RngState | None = None
        self._resume_rng: RngState | None = None
        self._eval_cache: list[Batch] | None = None
        self._train_seconds = 0.0  # time spent in training steps since the last log (not eval/saving)
        self._rank_tokens = 0  # this rank's tokens since the last log
        self._mark = 0.0  # perf_counter at the last `_tick`

    # --- setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        seed_everything(self.cfg.seed)
        self.device = pick_device(self.device_name)
        self._check_device()
        self.sources = plan_sources(self.base_dir, self.init_dir, self.resume_dir)
        self.tokenizer = load_tokenizer(self.sources.tokenizer)
        train_records, valid_records = self._read_records()
        self.label_names = self._resolve_labels(train_records, valid_records)
        self.model = self._build_model()
        self._encode(train_records, valid_records)
        self._fit_memory()  # before the weights go to the device: fail fast instead of running out of memory
        self.model = self._place(self.model)
        self.net = self.world.wrap(self.model, self.device)  # DDP over `model` in a group; FSDP shards it in place
        self._build_optimizer()
        self._compile()
        if self.resume_dir is not None:
            self._restore(state_dir(self.resume_dir))
        self._prepare_reference()
        self._announce()

    def _read_records(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        train = D.read_records(self.train_path, self.cfg.training_file_kind, self.cfg.cleaning, self.hooks)
        if not train:
            raise TrainingDataError("the training file has no records")
        valid = D.read_records(self.valid_path, self.cfg.validation_file_kind, self.cfg.cleaning, self.hooks,
                               where="validation") if self.valid_path else []
        return train, valid

    def _resolve_labels(self, train: list[dict[str, Any]], valid: list[dict[str, Any]]) -> list[str] | None:
        if self.task is not Task.classification:
            return None
        names = self._checkpoint_labels() or D.label_names_from(train)
        D.check_labels(train, names, "training")
        D.check_labels(valid, names, "validation")
        return names

    def _checkpoint_labels(self) -> list[str] | None:
        for ckpt in (self.resume_dir, self.init_dir):
            if ckpt is not None and has_info(ckpt):
                info = read_info(ckpt)
                if info.task is Task.classification and info.label_names:
                    return list(info.label_names)
        return None

    def _build_model(self) -> torch.nn.Module:
        if self.kind is TrainingKind.qlora:
            return self._build_qlora_model()
        model = load_task_model(self.task, self.sources.weights, self.tokenizer, self.label_names)
        if self.sources.adapter is not None:
            return self._attach_adapter(model, self.sources.adapter)
        return apply_training_type(model, self.task, self.cfg.training_type, self.spec.lora_target_modules)

    def _attach_adapter(self, model: Any, adapter_dir: Path) -> torch.nn.Module:
        info = read_info(adapter_dir)
        if info.task is not self.task:
            raise InputError(f"the checkpoint was trained for task '{info.task}', this job is '{self.task}'")
        found = adapter_kind(adapter_dir)
        if found == ADAPTER_KINDS.get(self.kind):
            if self.resume_dir is None:
                self.hooks.message(f"Continuing the checkpoint's {found} adapter (its own settings apply)")
            return load_adapter(model, adapter_dir, trainable=True)
        if found == "LORA" and self.kind in (TrainingKind.full, TrainingKind.freeze):
            merged = load_adapter(model, adapter_dir, trainable=False).merge_and_unload()
            return apply_training_type(
                merged, self.task, self.cfg.training_type, self.spec.lora_target_modules
            )
        raise InputError(
            f"a {info.training_type} checkpoint cannot be continued with training type '{self.kind}'"
        )

    def _max_len(self) -> int:
        limit = getattr(self.model.config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        virtual = 0
        if isinstance(self.model, PeftModel) and self.model.active_peft_config.is_prompt_learning:
            virtual = self.model.active_peft_config.num_virtual_tokens
        return max(8, min(self.cfg.max_seq_length, int(limit) - virtual))

    def _encode(self, train: list[dict[str, Any]], valid: list[dict[str, Any]]) -> None:
        if self.dpo is not None:
            self._encode_pairs(train, valid)
            return
        decoder = self.spec.architecture == "decoder"
        args = (self.task, self.tokenizer, self._max_len(), self.label_names, decoder)
        encoded = D.encode(train, *args)
        if not encoded.examples:
            raise TrainingDataError("no usable training examples after tokenization (check max_seq_length)")
        self.skipped = encoded.skipped
        self.train_set = encoded.examples
        self.valid_set = D.encode(valid, *args).examples if valid else []
        pad_left = self.tokenizer.padding_side == "left" or (decoder and self.task is not Task.causal_lm)
        self.collator = D.Collator(self.task, self.tokenizer, pad_left, self.cfg.seed)
        self.train_lengths = [len(e.input_ids) for e in self.train_set]
        self._plan_packing()
        self._plan_steps()

    def _plan_steps(self) -> None:
        n_micro = len(D.epoch_batches(self.train_lengths, self.cfg.batch_size, self.cfg.seed, 0))
        self.steps_per_epoch = math.ceil(n_micro / max(1, self.cfg.gradient_accumulation_steps))
        self.total_steps = self.steps_per_epoch * self.cfg.n_epochs
        if self.cfg.max_steps is not None:
            self.total_steps = max(1, min(self.total_steps, self.cfg.max_steps))

    def _encode_pairs(self, train: list[dict[str, Any]], valid: list[dict[str, Any]]) -> None:
        """DPO: the examples are preference pairs (`ml.data.tokens.Pair`), batched as pairs."""
        if self.task is not Task.causal_lm or self.cfg.packing:
            raise InputError("DPO trains causal_lm jobs without packing", param="method")
        self.train_set, self.skipped = D.encode_pairs(train, self.tokenizer, self._max_len())
        if not self.train_set:
            raise TrainingDataError("no usable preference pairs after tokenization (check max_seq_length)")
        self.valid_set = D.encode_pairs(valid, self.tokenizer, self._max_len())[0] if valid else []
        pad_left = self.tokenizer.padding_side == "left"
        self.collator = dpo.PairCollator(D.Collator(self.task, self.tokenizer, pad_left, self.cfg.seed))
        self.train_lengths = [p.length for p in self.train_set]
        self._plan_packing()  # off: refused above
        self._plan_steps()

    def _prepare_reference(self) -> None:
        """DPO: the reference log-probs of every pair, before the first step (`ml.training.dpo.Reference`)."""
        if self.dpo is None:
            return
        fresh_adapter = self.kind in ADAPTER_KINDS and (self.init_dir is None or not is_adapter_dir(self.init_dir))
        self.reference = dpo.Reference(adapter_disabled=fresh_adapter)
        resume = state_dir(self.resume_dir) if self.resume_dir is not None else None
        self.reference.prepare(self.model, self._pair_sets(), self._reference_batches, self.device, resume)
        source = "the base with the adapter disabled" if fresh_adapter else "the starting weights"
        self.hooks.message(
            f"DPO (beta {self.cfg.beta}) on {len(self.train_set)} preference pairs ({len(self.valid_set)} "
            f"validation); reference log-probs from {source}", data={"method": "dpo", "beta": self.cfg.beta})

    def _pair_sets(self) -> dict[str, list[Any]]:
        return {"train": self.train_set, "valid": self.valid_set}

    def _reference_batches(self, pairs: list[Any]) -> list[dict[str, torch.Tensor]]:
        """The pairs in order (their scores are attached in order), `batch_size` at a time."""
        size = self.cfg.batch_size
        return [self.collator(pairs[i : i + size], (-2, i)) for i in range(0, len(pairs), size)]

    def _build_optimizer(self) -> None:
        named = trainable_parameters(self.model)
        if not named:
            raise RuntimeError("the model has no trainable parameters")
        decay = [p for _, p in named if p.ndim >= 2]
        no_decay = [p for _, p in named if p.ndim < 2]  # biases and norms
        groups = [
            {"params": decay, "weight_decay": self.cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        self.optimizer = compiled.adamw([g for g in groups if g["params"]], self.cfg.learning_rate)
        warmup = math.ceil(self.cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.cfg.lr_scheduler, warmup, self.total_steps)
        )

    def _restore(self, state_dir: Path) -> None:
        optimizer = ConsolidatedOptimizer(self.model, self.optimizer).as_optimizer() if self.world.sharded \
            else self.optimizer  # FSDP: every rank reads the full state and keeps its shard
        rng, state = load_state(state_dir, optimizer, self.scheduler, self.scaler)
        self.progress = Progress(**state)
        self._resume_rng = rng

    def _announce(self) -> None:
        n_trainable = sum(p.numel() for _, p in trainable_parameters(self.model))
        n_total = sum(p.numel() for p in self.model.parameters())
        cfg, p = self.cfg, self.progress
        text = (
            f"Training {len(self.train_set)} examples ({len(self.valid_set)} validation) for {cfg.n_epochs} "
            f"epochs: {self.total_steps} steps of {cfg.batch_size}x{cfg.gradient_accumulation_steps} on "
            f"{self.device}; {n_trainable:,} of {n_total:,} parameters trainable ({self.kind})"
        )
        if self.world.distributed:
            how = "fully sharded data parallel (FSDP)" if self.world.sharded else "data parallel"
            text += f"; {how} over {self.world.size} processes ({self.world.backend})"
        if self.resume_dir is not None:
            text += f"; resuming at step {p.step} (epoch {p.epoch}, step {p.step_in_epoch} in it)"
        self.hooks.message(
            text,
            data={
                "train_examples": len(self.train_set),
                "total_steps": self.total_steps,
                "trainable_parameters": n_trainable,
                "device": str(self.device),
                **self.world.describe(self.model),
            },
        )
        if self.skipped:
            self.hooks.message(
                f"{self.skipped} examples skipped: nothing to learn from after truncation to "
                f"{self._max_len()} tokens",
                level="warn",
            )
        if self.cfg.early_stopping and not self.valid_set:
            self.hooks.message("early stopping needs a validation file; it is off", level="warn")
        if self.spec.new_head(self.task.value) and self.resume_dir is None and self.init_dir is None:
            self.hooks.message(
                f"{self.spec.id} ships no pretrained {self.task} head: training starts from a new, randomly "
                "initialised head, so early predictions are meaningless and the base model gets no score",
                level="warn", data={"new_head": self.task.value},
            )

    # --- memory and speed: precision, QLoRA, packing, gradient checkpointing ----------------------

    def _check_device(self) -> None:
        """Refuse what this worker cannot train before loading anything (the runner fails the job with it)."""
        self.precision = Precision.resolve(self.cfg.precision, self.device)
        self.scaler = self.precision.scaler()
        if self.world.distributed and self.kind is TrainingKind.qlora:
            raise InputError("multi-device training does not support QLoRA yet", param="resources")
        if self.world.sharded:
            self._check_sharding()
        if self.kind is TrainingKind.qlora:
            if self.task is not Task.causal_lm:
                raise InputError("QLoRA trains causal_lm jobs only", param="training_type")
            if (why := qlora_unavailable(self.device)) is not None:
                raise InputError(why, param="training_type")

    def _check_sharding(self) -> None:
        """FSDP shards full fine-tunes. An adapter's trainable state is a few MB (sharding it saves
        nothing worth a second code path: DDP trains it), and fp16's loss scaler would need every rank
        to agree on skipped steps over sharded gradients, which `torch.amp.GradScaler` does not do."""
        if self.kind not in (TrainingKind.full, TrainingKind.freeze):
            raise InputError(f"resources.strategy=fsdp shards full fine-tunes (training_type full or freeze), "
                             f"not {self.kind}: use ddp", param="resources.strategy",
                             code="unsupported_resources")
        if self.precision.name == "fp16":
            raise InputError("resources.strategy=fsdp trains in bf16 or fp32, not fp16", param="precision",
                             code="unsupported_resources")
        if self.dpo is not None:
            raise InputError("resources.strategy=fsdp does not train DPO yet: use ddp", param="resources.strategy",
                             code="unsupported_resources")

    def _build_qlora_model(self) -> torch.nn.Module:
        model = load_quantized_model(self.sources.weights, self.device, self.precision.dtype or torch.float32)
        if self.sources.adapter is not None:  # a LoRA checkpoint continues on the 4-bit base
            return self._attach_adapter(model, self.sources.adapter)
        return apply_qlora(model, self.cfg.training_type, self.spec.lora_target_modules)

    def _place(self, model: torch.nn.Module) -> torch.nn.Module:
        """On the device, trainable parameters in fp32 (a 4-bit model was loaded onto it)."""
        placed = model if self.kind is TrainingKind.qlora else model.to(self.device)
        upcast_trainable(placed)
        return placed

    def _plan_packing(self) -> None:
        """Packed SFT plans batches over rows of several examples (`ml.data.packing`): `train_lengths`
        become row lengths, so steps, windows and resume positions count rows."""
        self.packed_rows: list[list[int]] | None = None
        if not self.cfg.packing:
            return
        if self.task is not Task.causal_lm or self.kind is TrainingKind.prompt_tuning:
            raise InputError("packing applies to causal_lm jobs other than prompt tuning", param="packing")
        self.packed_rows = pack_rows(self.train_lengths, self._max_len())
        self.train_lengths = row_lengths(self.packed_rows, self.train_lengths)
        self.packer = PackedCollator(self.collator.pad_id)
        if self.device.type == "cpu":  # GPUs run the block-diagonal mask in one fused kernel per layer
            use_packed_attention(self.model)

    def _collate_train(self, idx: list[int], key: tuple[int, int]) -> dict[str, torch.Tensor]:
        if self.packed_rows is None:
            return self._collate(self.train_set, idx, key)
        return self.packer([[self.train_set[i] for i in self.packed_rows[r]] for r in idx])

    def _workload(self) -> memory.Workload:
        tt = self.cfg.training_type
        virtual = tt.num_virtual_tokens if self.kind is TrainingKind.prompt_tuning else 0
        targets = tuple(tt.lora_target_modules or self.spec.lora_target_modules)
        pair_rows = 2 if self.dpo is not None else 1  # a DPO pair is two sequences
        return memory.Workload(
            self.task, self.kind, rows=self.cfg.batch_size * pair_rows, seq_len=max(self.train_lengths),
            precision=self.precision.name,  # type: ignore[arg-type]
            device=self.device.type, lora_r=tt.lora_r, lora_targets=targets, virtual_tokens=virtual,
            num_labels=len(self.label_names or []) or 1, world=self.world.size, sharded=self.world.sharded,
        )

    def _fit_memory(self) -> None:
        """Predict the peak (`ml.memory`) against what this device has free, fail fast when it cannot fit,
        and turn gradient checkpointing on when asked (or, for "auto", when needed to fit)."""
        shape = memory.shape_from_dir(self.sources.weights)
        setting = self.cfg.gradient_checkpointing
        if shape is None:  # a model the memory model cannot read: only an explicit request counts
            self._use_checkpointing(setting is True and self.kind is not TrainingKind.freeze)
            return
        work = self._workload()
        capacity = self._device_capacity(memory.estimate(shape, work).weights_bytes)
        est = memory.plan(shape, work, setting, capacity)
        where = f"{self.device} ({self.precision.name})"
        if capacity is not None and est.peak_bytes > capacity:
            raise InputError(
                f"This job needs about {est.summary()} on {where}, but only {memory.gib(capacity)} is free: "
                "use a smaller batch_size or max_seq_length, gradient_checkpointing, or a LoRA / QLoRA "
                "training type", param="batch_size", code="insufficient_memory")
        self._use_checkpointing(est.checkpointing)
        packing = f"; packing {len(self.train_set)} examples into {len(self.train_lengths)} rows" \
            if self.packed_rows is not None else ""
        self.hooks.message(
            f"Memory: {est.summary()} predicted on {where}; gradient checkpointing "
            f"{'on' if est.checkpointing else 'off'}{packing}",
            data={"memory": est.as_dict(capacity), "precision": self.precision.name,
                  "packing": self.packed_rows is not None})

    def _device_capacity(self, weights: int) -> int | None:
        """Bytes this job can use on its device: free now, plus the weights when they already sit there."""
        if self.device.type == "cuda":
            free = int(torch.cuda.mem_get_info(self.device)[0])
            return free + (weights if self.kind is TrainingKind.qlora else 0)
        available = memory.host_available_bytes() if self.device.type == "cpu" else None
        return None if available is None else available + weights

    def _compile(self) -> None:
        """`torch.compile` the training forward when asked, or when it pays (`ml.training.compiled`)."""
        blocker = None
        if self.kind is TrainingKind.qlora or self.dpo is not None or self.world.distributed:
            blocker = "not supported with QLoRA, DPO or multi-device training yet"
        elif self.packed_rows is not None or compiled.checkpointing_on(self.model):
            blocker = "not supported with packing or gradient checkpointing yet"
        plan = compiled.plan(self.cfg.compile, self.device, self.total_steps, blocker)
        if plan.on:
            self.net = compiled.compile_module(self.net)
        if plan.on or self.cfg.compile is True:
            self.hooks.message(f"Training forward: {plan.why}", data={"compile": plan.on})

    def _use_checkpointing(self, on: bool) -> None:
        if on:
            enable_gradient_checkpointing(self.model)

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _step_optimizer(self) -> None:
        if self.scaler is None:
            self.optimizer.step()
            return
        self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
        self.scaler.update()

    # --- loop ---------------------------------------------------------------------------------

    def train(self) -> TrainOutcome:
        if self._resume_rng is not None:
            restore_rng(self._resume_rng)
        self.model.train()
        p = self.progress
        self._mark = time.perf_counter()
        while p.epoch < self.cfg.n_epochs and not self._budget_spent():
            epoch = p.epoch
            windows = self._windows(epoch)
            for index in range(p.step_in_epoch, len(windows)):
                start, window = windows[index]
                t0 = time.perf_counter()
                result = self._train_step(epoch, start, window)
                self._train_seconds += time.perf_counter() - t0
                if isinstance(result, Interrupt):
                    return self._stop(result)
                self._advance(len(windows))
                self._tick()
                if self._after_step(result, epoch_end=p.epoch > epoch):
                    return self._finish(stopped_early=True)
                if self._budget_spent():
                    return self._finish(stopped_early=False, budget=True)
        return self._finish(stopped_early=False)

    def _tick(self) -> None:
        now = time.perf_counter()
        self.progress.loop_seconds += now - self._mark
        self._mark = now

    def _budget_spent(self) -> bool:
        """`max_steps` (as `total_steps`) or `max_train_seconds` reached before the last epoch ends."""
        p, limit = self.progress, self.cfg.max_train_seconds
        spent = p.step >= self.total_steps or (limit is not None and p.loop_seconds >= limit)
        return bool(self.world.agree(int(spent)))  # clocks differ between ranks: rank 0's call

    def _windows(self, epoch: int) -> list[tuple[int, list[list[int]]]]:
        """Micro-batches of this epoch grouped per optimizer step, with the index of the first one."""
        micro = D.epoch_batches(self.train_lengths, self.cfg.batch_size, self.cfg.seed, epoch)
        accum = max(1, self.cfg.gradient_accumulation_steps)
        return [(i, micro[i : i + accum]) for i in range(0, len(micro), accum)]

    def _train_step(self, epoch: int, start: int, window: list[list[int]]) -> StepResult | Interrupt:
        """One optimizer step over the window's global micro-batches (this rank's share of each): the
        summed loss over the window's global target count, so any world size takes the same step."""
        self._step_rng = capture_rng()
        shards = [self.world.shard(idx) for idx in window]
        batches = [self._collate_train(idx, (epoch, start + j)) for j, (idx, _) in enumerate(shards)]
        weights = [1.0 if counts else 0.0 for _, counts in shards]
        local = sum(int(b["n_targets"]) * w for b, w in zip(batches, weights, strict=True))
        total = max(1.0, self.world.sum(local)[0])
        loss_value, tokens = 0.0, 0
        for j, (batch, weight) in enumerate(zip(batches, weights, strict=True)):
            why = self._interrupted()
            if why is not None:
                self.optimizer.zero_grad(set_to_none=True)
                if self.dpo is not None:
                    self.dpo.stats.reset()
                return why
            with self._sync(last=j == len(batches) - 1):
                loss = self._loss(batch, counted=bool(weight)) / total
                loss = loss if weight else loss * 0.0
                # DDP and FSDP average the ranks' gradients: scale up so that they sum instead
                self._backward(loss * self.world.size if self.world.distributed else loss)
            loss_value += loss.item()
            tokens += int(batch["n_tokens"]) * int(weight)
        loss_value, summed_tokens = self.world.sum(loss_value, tokens)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self._optimizer_step()
        stats = self._step_stats()
        return StepResult(loss_value, int(summed_tokens), lr, stats, rank_tokens=tokens)

    def _step_stats(self) -> dict[str, float]:
        """DPO's per-pair stat sums of the step, over every rank's pairs."""
        if self.dpo is None:
            return {}
        local = self.dpo.stats.take()
        return dict(zip(local, self.world.sum(*local.values()), strict=True))

    def _sync(self, last: bool) -> Any:
        """DDP all-reduces the gradients on the window's last backward only."""
        no_sync = getattr(self.net, "no_sync", None)
        return nullcontext() if last or no_sync is None else no_sync()

    def _interrupted(self) -> Interrupt | None:
        """The hooks' answer; in a group rank 0's, so every rank stops at the same micro-batch."""
        if not self.world.distributed:
            return self.hooks.interrupted()
        mine = INTERRUPTS.index(self.hooks.interrupted()) if self.world.main else 0
        return INTERRUPTS[self.world.agree(mine)]

    def _collate(
        self, examples: list[Any], idx: list[int], key: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        return self.collator([examples[i] for i in idx], key)

    def _loss(self, batch: dict[str, torch.Tensor], counted: bool = True) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.dpo is not None:  # through `net`: under DDP its forward is what syncs the gradients
            with self.precision.autocast():
                return self.dpo.loss_sum(self.net, batch, dpo.is_prompt_learning(self.model), counted)
        with self.precision.autocast():
            packed = PACKED_KEY in batch
            logits = forward_packed(self.net, batch) if packed else forward_logits(self.net, batch, self.task)
        return loss_sum(self.task, logits, batch)

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self._step_optimizer()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _advance(self, n_windows: int) -> None:
        p = self.progress
        p.step += 1
        p.step_in_epoch += 1
        if p.step_in_epoch >= n_windows:
            p.epoch, p.step_in_epoch = p.epoch + 1, 0

    def _after_step(self, res: StepResult, epoch_end: bool) -> bool:
        """Progress, logging, evaluation, checkpoints. Returns True when early stopping triggers."""
        p = self.progress
        p.trained_tokens += res.tokens
        self._rank_tokens += res.rank_tokens
        p.last_loss, p.last_lr = res.loss, res.lr
        p.log_loss, p.log_steps, p.log_tokens = (
            p.log_loss + res.loss,
            p.log_steps + 1,
            p.log_tokens + res.tokens,
        )
        for key, value in res.stats.items():
            p.log_stats[key] = p.log_stats.get(key, 0.0) + value
        self.hooks.progress(p.step, self.total_steps, self._epoch_float(), p.trained_tokens)
        if p.step % max(1, self.cfg.log_every_steps) == 0:
            self._log()
        stop = bool(self.world.agree(int(self._maybe_evaluate(epoch_end))))
        every = self.cfg.checkpoint_every_steps
        if (every > 0 and p.step % every == 0) or (every <= 0 and epoch_end) or stop:
            self._checkpoint()
        return stop

    def _epoch_float(self) -> float:
        return self.progress.step / max(1, self.steps_per_epoch)

    def _log(self) -> None:
        p = self.progress
        if p.log_steps == 0:
            return
        self.hooks.metrics(
            p.step,
            {
                "train_loss": p.log_loss / p.log_steps,
                "lr": p.last_lr,
                "tokens_per_second": p.log_tokens / max(self._train_seconds, 1e-9),
                "epoch": self._epoch_float(),
                **dpo.means(p.log_stats),
                **self._rank_rates(),
            },
        )
        p.log_loss, p.log_steps, p.log_tokens, p.log_stats = 0.0, 0, 0, {}
        self._train_seconds, self._rank_tokens = 0.0, 0

    def _rank_rates(self) -> dict[str, float]:
        """In a group, each rank's own tokens/s (`rank<r>_tokens_per_second`): a slow device or an
        unbalanced shard shows up here, where the global rate only drops. Every rank logs at the same
        steps, so the gather is a collective they all reach."""
        if not self.world.distributed:
            return {}
        rates = self.world.gather_all(self._rank_tokens / max(self._train_seconds, 1e-9))
        return {f"rank{r}_tokens_per_second": rate for r, rate in enumerate(rates)}

    # --- evaluation and early stopping --------------------------------------------------------

    def _maybe_evaluate(self, epoch_end: bool) -> bool:
        every = self.cfg.eval_every_steps
        due = (every > 0 and self.progress.step % every == 0) or (every <= 0 and epoch_end)
        if not self.valid_set or not due or self.progress.last_eval_step == self.progress.step:
            return False
        metrics = self.evaluate()
        return metrics is not None and self._early_stop(metrics)

    def evaluate(self) -> dict[str, float] | None:
        """Validation loss + task metrics, reported through hooks. None if interrupted midway. In a
        DDP group rank 0 evaluates alone (the others wait at the next collective); under FSDP every rank
        runs the same batches (each layer's forward all-gathers its weights) and stops on rank 0's
        interrupt, and only rank 0's hooks report."""
        names = self.label_names
        if self.world.distributed and not self.world.sharded and self.dpo is None:
            return self._evaluate_split(names)
        if not self.world.main and not self.world.sharded:
            return None
        stop = self._interrupted if self.world.sharded else self.hooks.interrupted
        if self.dpo is not None:
            metrics = dpo.evaluate(self.model, self.eval_batches(), self.cfg.beta, self.device, stop)
        else:
            metrics = score(self.model, self.eval_batches(), self.task, self.device, len(names or []), stop, names)
        if metrics is not None:
            self.progress.last_eval_step, self.progress.eval_metrics = self.progress.step, metrics
            self.hooks.metrics(self.progress.step, metrics)
        return metrics

    def _evaluate_split(self, names: list[str] | None) -> dict[str, float] | None:
        """DDP: each rank scores every N-th validation batch (an N-th of the time) and the ranks add up
        their loss sums and gather their predictions. Only rank 0 watches for a cancel; whether it
        finished is agreed, so every rank records the evaluation alike (and meets the same collectives
        at the next one)."""
        w = self.world
        mine = score_sums(self.model, self.eval_batches()[w.rank :: w.size], self.task, self.device,
                          self.hooks.interrupted if w.main else None)
        if not w.agree(int(mine is not None)) or mine is None:
            return None
        loss, count = w.sum(mine.loss, mine.count)
        preds: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        if self.task in (Task.classification, Task.regression):
            dtype = torch.long if self.task is Task.classification else torch.float32
            for local, merged in ((mine.preds, preds), (mine.targets, targets)):
                rows = torch.cat(local) if local else torch.zeros(0)
                merged.append(w.gather_rows(rows).to(dtype))
        metrics = task_metrics(self.task, loss / max(count, 1.0), preds, targets, len(names or []), names)
        self.progress.last_eval_step, self.progress.eval_metrics = self.progress.step, metrics
        self.hooks.metrics(self.progress.step, metrics)
        return metrics

    def eval_batches(self) -> list[Batch]:
        """The validation set as fixed batches (and MLM masks), so evaluations are comparable."""
        if self._eval_cache is None:
            lengths = [e.length if isinstance(e, D.Pair) else len(e.input_ids) for e in self.valid_set]
            plan = D.eval_batches(lengths, self.cfg.batch_size)
            self._eval_cache = [self._collate(self.valid_set, idx, (-1, i)) for i, idx in enumerate(plan)]
        return self._eval_cache

    def current_metrics(self) -> dict[str, float] | None:
        """The last evaluation's metrics when it scored the current weights."""
        p = self.progress
        return dict(p.eval_metrics) if p.last_eval_step == p.step and p.eval_metrics else None

    def _early_stop(self, metrics: dict[str, float]) -> bool:
        es, p = self.cfg.early_stopping, self.progress
        if es is None or es.metric not in metrics:
            return False
        value = metrics[es.metric]
        if improved(es.metric, value, p.best, es.min_delta):
            p.best, p.bad_evals = value, 0
        else:
            p.bad_evals += 1
        return p.bad_evals >= es.patience

    # --- outcomes and checkpoints -------------------------------------------------------------

    def _finish(self, stopped_early: bool, budget: bool = False) -> TrainOutcome:
        p = self.progress
        self._log()
        if budget and p.epoch < self.cfg.n_epochs:
            self.hooks.message(
                f"Training budget reached at step {p.step} ({self._epoch_float():.2f} epochs, "
                f"{p.loop_seconds:.0f} s): max_steps={self.cfg.max_steps}, max_train_seconds="
                f"{self.cfg.max_train_seconds}", data={"step": p.step, "loop_seconds": p.loop_seconds},
            )
        if not stopped_early and self.valid_set and p.last_eval_step != p.step:
            self.evaluate()
        if p.last_ckpt_step != p.step:
            self._checkpoint()
        return TrainOutcome(
            completed=True,
            step=p.step,
            trained_tokens=p.trained_tokens,
            final_metrics=self._metrics(),
            stopped_early=stopped_early,
        )

    def _stop(self, why: Interrupt) -> TrainOutcome:
        p = self.progress
        if why is Interrupt.paused and p.last_ckpt_step != p.step:
            self._checkpoint(rng=self._step_rng)  # the state at the last completed step
        self.hooks.message(f"Training interrupted ({why.value}) at step {p.step}")
        return TrainOutcome(
            completed=False,
            interrupt=why,
            step=p.step,
            trained_tokens=p.trained_tokens,
            final_metrics=self._metrics(),
        )

    def _metrics(self) -> dict[str, float]:
        out = dict(self.progress.eval_metrics)
        if self.progress.last_loss is not None:
            out["train_loss"] = self.progress.last_loss
        return out

    def _checkpoint(self, rng: RngState | None = None) -> None:
        self.progress.last_ckpt_step = self.progress.step
        # DDP: the ranks' weights and optimizer states are identical, rank 0 saves alone; FSDP: every
        # rank sends its shards to rank 0, which saves
        if self.world.main or self.world.sharded:
            local_dir = self.workdir / f"checkpoint-{self.progress.step:08d}-{uuid.uuid4().hex[:8]}"
            info = self._save(local_dir, with_state=True, rng=rng or capture_rng())
            if self.world.main:
                self.hooks.checkpoint(local_dir, info)
        self.world.barrier()

    def save_checkpoint(self, local_dir: Path, with_state: bool = True) -> CheckpointInfo:
        """Rank 0 writes; under FSDP every rank must call it (the weights are gathered)."""
        return self._save(Path(local_dir), with_state, capture_rng())

    def _save(self, local_dir: Path, with_state: bool, rng: RngState) -> CheckpointInfo:
        adapter_on_checkpoint = isinstance(self.model, PeftModel) and self.sources.base_checkpoint
        info = CheckpointInfo(
            task=self.task,
            training_type=self.kind,
            base_model=self.cfg.base_model,
            step=self.progress.step,
            epoch=self._epoch_float(),
            metrics=self._metrics(),
            label_names=self.label_names,
            problem_type=PROBLEM_TYPES.get(self.task),
            base_checkpoint_key=self.cfg.init_checkpoint_key if adapter_on_checkpoint else None,
        )
        full: dict[str, torch.Tensor] | None = None
        optimizer: torch.optim.Optimizer = self.optimizer
        if self.world.sharded:  # collectives: rank 0 gets the whole weights and optimizer state
            full, view = full_model_state(self.model), ConsolidatedOptimizer(self.model, self.optimizer)
            if with_state:
                view.gather()
            optimizer = view.as_optimizer()
        if not self.world.main:
            return info
        checkpoint.save(local_dir, self.model, self.tokenizer, info, state_dict=full)
        if with_state:
            save_state(state_dir(local_dir), optimizer, self.scheduler, rng, asdict(self.progress), self.scaler)
            if self.dpo is not None:
                self.reference.save(state_dir(local_dir), self._pair_sets())
        return info

    def cleanup(self) -> None:
        for name in ("model", "net", "optimizer", "scheduler", "_eval_cache"):
            if hasattr(self, name):
                setattr(self, name, None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
