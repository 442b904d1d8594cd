"""The model registry: catalog base models plus the project's fine-tuned models."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.kit.db import utcnow
from app.kit.errors import NotFound
from app.kit.hotcache import bump_after_commit
from app.models_registry import repository
from app.models_registry.catalog import load_catalog
from app.models_registry.schemas import ModelOut
from app.orm import FineTunedModel, Project

_BOOT = int(utcnow().timestamp())


def _fine_tuned_out(m: FineTunedModel) -> ModelOut:
    return ModelOut(id=m.id, created=int(m.created_at.timestamp()), owned_by=m.project_id, kind="fine-tuned",
                    tasks=[m.task], base_model=m.base_model, fine_tuning_job=m.job_id,
                    training_type=m.training_type, info=m.info or {})


def list_models(session: Session, project: Project) -> list[ModelOut]:
    base = [ModelOut(id=s.id, created=_BOOT, owned_by="tunehouse", kind="base", tasks=s.tasks,
                     training_types=s.training_types, info={"description": s.description,
                                                            "max_seq_length": s.max_seq_length})
            for s in load_catalog().values()]
    return base + [_fine_tuned_out(m) for m in repository.live_models(session, project.id)]


def get_fine_tuned(session: Session, project: Project, model_id: str) -> FineTunedModel:
    row = repository.live_model(session, project.id, model_id)
    if row is None:
        raise NotFound(f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    return row


def get_model(session: Session, project: Project, model_id: str) -> ModelOut:
    for out in list_models(session, project):
        if out.id == model_id and out.kind == "base":
            return out
    return _fine_tuned_out(get_fine_tuned(session, project, model_id))


def delete_model(session: Session, project: Project, model_id: str) -> str:
    """Soft delete: the model stops serving at once; its job and checkpoints stay. Returns the
    model's storage key (for cache eviction)."""
    row = get_fine_tuned(session, project, model_id)
    row.deleted_at = utcnow()
    session.flush()
    bump_after_commit(session)  # resolved models are cached (app.inference.resolve)
    return row.storage_key
