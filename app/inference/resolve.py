"""`model` -> a servable checkpoint dir, scoped to the caller's project. Always runs in the API
(never in the inference worker): 404 for unknown / other project's / deleted, 409 while the
job that will produce the model has not succeeded. Lookups go through the model repository.

A catalog base model id resolves to the base itself (public: any project's key may use it), which
`check_base` lets through only for chat / completions on a causal LM: a base's classification,
regression or masked-LM head is untrained, so its predictions would be noise."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.jobs.state import JobStatus
from app.kit.errors import Conflict, InvalidRequest, NotFound
from app.models_registry import repository
from app.models_registry.catalog import load_catalog
from app.orm import Checkpoint, FineTunedModel, Job
from ml.inference.types import BASE_KEY_PREFIX, GENERATIVE_TASKS, ModelRef


class ModelDeleted(NotFound):
    """404 for a deleted model; carries the dirs to evict from the engine's cache."""

    def __init__(self, model: str, storage_keys: list[str]) -> None:
        super().__init__(f"The model '{model}' does not exist.", param="model", code="model_not_found")
        self.storage_keys = storage_keys


def resolve_model(session: Session, project_id: str, model: str) -> ModelRef:
    base = catalog_base(model)
    if base is not None:
        return base
    row = repository.model_row(session, project_id, model)
    if row is not None:
        if row.deleted_at is not None:
            raise ModelDeleted(model, [row.storage_key])
        return _from_registry(model, row)
    ckpt = repository.checkpoint_by_ref(session, project_id, model)
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
    deleted = repository.model_of_job(session, job.id, deleted=True)
    if deleted is not None:  # a deleted model's checkpoints stop serving with it
        raise ModelDeleted(name, [ckpt.storage_key, deleted.storage_key])
    config = job.config or {}
    return ModelRef(name=name, storage_key=ckpt.storage_key, task=job.task,
                    training_type=(job.training_type or {}).get("type"),
                    base_model=config.get("base_model") or job.model)


def _raise_if_pending(session: Session, project_id: str, model: str) -> None:
    """An `ft:` name whose job exists but has not produced the model yet."""
    parsed = repository.parse_ft_name(model)
    if parsed is None:
        return
    job = session.scalar(select(Job).where(Job.id == parsed.job_id, Job.project_id == project_id))
    if job is not None and job.status != JobStatus.succeeded:
        raise Conflict(f"The model '{model}' is not ready: its fine-tuning job {job.id} is {job.status}.",
                       param="model", code="model_not_ready")


def catalog_base(model: str) -> ModelRef | None:
    """A catalog base model as itself (no database): a causal LM if it can be one, else its first task."""
    spec = load_catalog().get(model)
    if spec is None:
        return None
    task = "causal_lm" if "causal_lm" in spec.tasks else spec.tasks[0]
    return ModelRef(name=model, storage_key=BASE_KEY_PREFIX + model, task=task, base_model=model)


def check_base(ref: ModelRef, tasks: tuple[str, ...], enabled: bool) -> None:
    """400 `model_not_servable` for a base model that this endpoint (or this server) does not serve."""
    if not ref.storage_key.startswith(BASE_KEY_PREFIX):
        return
    if not enabled:
        raise InvalidRequest(f"Base models are not served on this server (TUNEHOUSE_SERVE_BASE_MODELS is off); "
                             f"fine-tune '{ref.name}' and use the 'ft:' model.", param="model",
                             code="model_not_servable")
    if ref.task not in GENERATIVE_TASKS or tasks != GENERATIVE_TASKS:
        raise InvalidRequest(f"Base model '{ref.name}' is served only as a causal LM (/v1/chat/completions, "
                             f"/v1/completions): its classification, regression and masked-LM heads are untrained, "
                             f"so predictions would be noise. Fine-tune it and use the 'ft:' model.",
                             param="model", code="model_not_servable")
