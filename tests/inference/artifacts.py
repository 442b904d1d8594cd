"""Real checkpoint dirs for the inference tests: peft / transformers models with random trained weights,
written by the checkpoint writer training uses (`ml.checkpoint.save`), plus the registry rows that point at them."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model
from sqlalchemy.orm import Session
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from app.kit import ids
from app.kit.storage import get_storage
from app.models_registry.catalog import local_base
from app.orm import Checkpoint, File, FineTunedModel, Job, Project
from ml import checkpoint
from ml.checkpoint import CheckpointInfo
from ml.config import Task, TrainingKind
from ml.modeling import load_tokenizer

ENCODER = "minilm-l6"
DECODER = "tiny-lm"
LABELS = ["negative", "neutral", "positive"]


def base_dir(base: str) -> Path:
    return local_base(base).path


def new_key(kind: str) -> str:
    return f"tests/inference/{kind}-{uuid.uuid4().hex[:10]}"


def _save(model: Any, key: str, task: str, training_type: str, base: str, labels: list[str] | None = None,
          problem_type: str | None = None, base_checkpoint_key: str | None = None) -> str:
    info = CheckpointInfo(task=Task(task), training_type=TrainingKind(training_type), base_model=base, step=10,
                          epoch=1.0, label_names=labels, problem_type=problem_type,
                          base_checkpoint_key=base_checkpoint_key)
    checkpoint.save(get_storage().local_dir(key), model, load_tokenizer(base_dir(base)), info)
    return key


def _randomize(model: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    """Make trainable adapter weights (incl. the modules_to_save head) non-trivial and distinct."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name or "prompt" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def lora_classifier(seed: int, labels: list[str] | None = None, task: str = "classification") -> str:
    labels = labels or LABELS
    num = 1 if task == "regression" else len(labels)
    extra = {"problem_type": "regression"} if task == "regression" else {}
    model = AutoModelForSequenceClassification.from_pretrained(base_dir(ENCODER), num_labels=num, **extra)
    peft = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8,
                                            target_modules=["query", "value"]))
    _randomize(peft, seed)
    return _save(peft, new_key(task), task, "lora", ENCODER, labels if task == "classification" else None,
                 "regression" if task == "regression" else "single_label_classification")


def prompt_classifier(seed: int) -> str:
    model = AutoModelForSequenceClassification.from_pretrained(base_dir(ENCODER), num_labels=len(LABELS))
    peft = get_peft_model(model, PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4))
    _randomize(peft, seed, scale=0.1)
    return _save(peft, new_key("prompt-cls"), "classification", "prompt_tuning", ENCODER, LABELS)


def lora_masked_lm(seed: int) -> str:
    model = AutoModelForMaskedLM.from_pretrained(base_dir(ENCODER))
    # like the trainer: the MLM transform trains via modules_to_save (not a mixable layer type)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"],
                                            modules_to_save=["cls.predictions.transform"]))
    _randomize(peft, seed, scale=0.05)
    return _save(peft, new_key("mlm"), "masked_lm", "lora", ENCODER)


def lora_causal(seed: int) -> str:
    model = AutoModelForCausalLM.from_pretrained(base_dir(DECODER))
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj", "v_proj"])
    peft = get_peft_model(model, config)
    _randomize(peft, seed)
    return _save(peft, new_key("lora-lm"), "causal_lm", "lora", DECODER)


def lora_on_checkpoint(seed: int, full_key: str) -> str:
    """An adapter trained on a full fine-tune (from_checkpoint): its base is that checkpoint."""
    model = AutoModelForCausalLM.from_pretrained(get_storage().local_dir(full_key))
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj", "v_proj"])
    peft = get_peft_model(model, config)
    _randomize(peft, seed)
    return _save(peft, new_key("lora-on-full"), "causal_lm", "lora", DECODER, base_checkpoint_key=full_key)


def prompt_causal(seed: int) -> str:
    model = AutoModelForCausalLM.from_pretrained(base_dir(DECODER))
    peft = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    _randomize(peft, seed)
    return _save(peft, new_key("prompt-lm"), "causal_lm", "prompt_tuning", DECODER)


def full_causal(seed: int) -> str:
    model = AutoModelForCausalLM.from_pretrained(base_dir(DECODER))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return _save(model, new_key("full-lm"), "causal_lm", "full", DECODER)


def register(db: Session, project: Project, key: str, *, task: str, base: str, training_type: str = "lora",
             status: str = "succeeded", with_model: bool = True, labels: list[str] | None = None,
             suffix: str = "t") -> tuple[str, Job]:
    """A job (+ its training file) and, when `with_model`, the registry row. Returns the model id."""
    job = _job(db, project, task=task, base=base, training_type=training_type, status=status, suffix=suffix)
    name = f"ft:{base}:{project.name}:{suffix}:{job.id}"
    job.fine_tuned_model = name if with_model else None
    if with_model:
        db.add(FineTunedModel(id=name, project_id=project.id, job_id=job.id, base_model=base, task=task,
                              training_type=training_type, storage_key=key,
                              info={"label_names": labels} if labels else {}))
    db.flush()
    return name, job


def add_checkpoint(db: Session, project: Project, job: Job, key: str, step: int = 10) -> Checkpoint:
    ckpt = Checkpoint(id=ids.checkpoint_id(), job_id=job.id, project_id=project.id, step=step, epoch=1.0,
                      metrics={}, storage_key=key,
                      fine_tuned_model_checkpoint=f"ft:{job.model}:{project.name}:t:{job.id}:ckpt-step-{step}")
    db.add(ckpt)
    db.flush()
    return ckpt


def _job(db: Session, project: Project, *, task: str, base: str, training_type: str, status: str,
         suffix: str) -> Job:
    file = File(id=ids.file_id(), project_id=project.id, purpose="fine-tune", filename="train.jsonl",
                storage_key=f"files/{uuid.uuid4().hex}")
    db.add(file)
    db.flush()
    job = Job(id=ids.job_id(), project_id=project.id, model=base, training_file=file.id, seed=0, task=task,
              training_type={"type": training_type}, hyperparameters={}, config={"base_model": base},
              status=status, suffix=suffix)
    db.add(job)
    db.flush()
    return job
