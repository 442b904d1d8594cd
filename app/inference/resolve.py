"""`model` -> a servable checkpoint dir, scoped to the caller's project. Always runs in the API
(never in the inference worker): 404 for unknown / other project's / deleted, 409 while the
job that will produce the model has not succeeded."""

from __future__ import annotations

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.kit.errors import Conflict, NotFound
from app.orm import Checkpoint, FineTunedModel, Job
from ml.inference.types import ModelRef


class ModelDeleted(NotFound):
    """404 for a deleted model; carries the dirs to evict from the engine's cache."""

    def __init__(self, model: str, storage_keys: list[str]) -> None:
        super().__init__(f"The model '{model}' does not exist.", param="model", code="model_not_found")
        self.storage_keys = storage_keys


def resolve_model(session: Session, project_id: str, model: str) -> ModelRef:
    row = session.scalar(select(FineTunedModel).where(FineTunedModel.id == model,
                                                      FineTunedModel.project_id == project_id))
    if row is not None:
        if row.deleted_at is not None:
            raise ModelDeleted(model, [row.storage_key])
        return _from_registry(model, row)
    ckpt = session.scalar(select(Checkpoint).where(
        Checkpoint.project_id == project_id,
        or_(Checkpoint.id == model, Checkpoint.fine_tuned_model_checkpoint == model)).limit(1))
    if ckpt is not None:
        return _from_checkpoint(session, model, ckpt)
    _raise_if_pending(session, project_id, model)
    raise NotFound(f"The model '{model}' does not exist or you do not have access to it.", param="model",
                   code="model_not_found")


def _from_registry(name: str, row: FineTunedModel) -> ModelRef:
    info = row.info or {}
    return ModelRef(name=name, storage_key=row.storage_key, task=row.task, training_type=row.training_type,
                    base_model=row.base_model, label_names=info.get("label_names"),
                    problem_type=info.get("problem_type"))


def _from_checkpoint(session: Session, name: str, ckpt: Checkpoint) -> ModelRef:
    job = session.get(Job, ckpt.job_id)
    if job is None:
        raise NotFound(f"The model '{name}' does not exist.", param="model", code="model_not_found")
    deleted = session.scalar(select(FineTunedModel).where(FineTunedModel.job_id == job.id,
                                                          FineTunedModel.deleted_at.is_not(None)).limit(1))
    if deleted is not None:  # a deleted model's checkpoints stop serving with it
        raise ModelDeleted(name, [ckpt.storage_key, deleted.storage_key])
    config = job.config or {}
    return ModelRef(name=name, storage_key=ckpt.storage_key, task=job.task,
                    training_type=(job.training_type or {}).get("type"),
                    base_model=config.get("base_model") or job.model)


def _raise_if_pending(session: Session, project_id: str, model: str) -> None:
    """`ft:<base>:<project>:<suffix>:<job id>`: the job exists but has not produced the model yet."""
    if not model.startswith("ft:"):
        return
    job = session.scalar(select(Job).where(Job.id == model.rsplit(":", 1)[-1], Job.project_id == project_id))
    if job is not None and job.status != "succeeded":
        raise Conflict(f"The model '{model}' is not ready: its fine-tuning job {job.id} is {job.status}.",
                       param="model", code="model_not_ready")
