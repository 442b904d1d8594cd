"""The model registry: catalog base models plus the project's fine-tuned models."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.kit.db import utcnow
from app.kit.errors import NotFound
from app.kit.hotcache import bump_after_commit
from app.kit.pagination import paginate
from app.models_registry import repository
from app.models_registry.catalog import BaseModelSpec, load_catalog
from app.models_registry.schemas import ModelOut
from app.orm import FineTunedModel, Project

_BOOT = int(utcnow().timestamp())


def _fine_tuned_out(m: FineTunedModel) -> ModelOut:
    return ModelOut(id=m.id, created=int(m.created_at.timestamp()), owned_by=m.project_id, kind="fine-tuned",
                    tasks=[m.task], base_model=m.base_model, fine_tuning_job=m.job_id,
                    training_type=m.training_type, info=m.info or {})


def _base_out(s: BaseModelSpec) -> ModelOut:
    return ModelOut(id=s.id, created=_BOOT, owned_by="tunehouse", kind="base", tasks=s.tasks,
                    training_types=s.training_types, info={"description": s.description,
                                                           "max_seq_length": s.max_seq_length})


MAX_LIST_LIMIT = 100


def list_models(session: Session, project: Project) -> list[ModelOut]:
    base = [_base_out(s) for s in load_catalog().values()]
    return base + [_fine_tuned_out(m) for m in repository.live_models(session, project.id)]


def list_models_page(session: Session, project: Project, *, after: str | None, limit: int
                     ) -> tuple[list[ModelOut], bool]:
    """Keyset page of the fine-tuned models (one index range scan however many there are); the
    first page (no `after`) starts with the catalog's base models, which are few and never paged."""
    rows, has_more = paginate(session, repository.live_models_stmt(project.id), FineTunedModel, after, limit,
                              FineTunedModel.created_at, max_limit=MAX_LIST_LIMIT)
    base = [] if after else [_base_out(s) for s in load_catalog().values()]
    return base + [_fine_tuned_out(m) for m in rows], has_more


def get_fine_tuned(session: Session, project: Project, model_id: str) -> FineTunedModel:
    row = repository.live_model(session, project.id, model_id)
    if row is None:
        raise NotFound(f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    return row


def get_model(session: Session, project: Project, model_id: str) -> ModelOut:
    spec = load_catalog().get(model_id)  # a base model: no need to read the project's fine-tuned ones
    if spec is not None and spec.id == model_id:
        return _base_out(spec)
    return _fine_tuned_out(get_fine_tuned(session, project, model_id))


def delete_model(session: Session, project: Project, model_id: str) -> str:
    """Soft delete: the model stops serving at once; its job and checkpoints stay. Returns the
    model's storage key (for cache eviction)."""
    row = get_fine_tuned(session, project, model_id)
    row.deleted_at = utcnow()
    session.flush()
    bump_after_commit(session)  # resolved models are cached (app.inference.resolve)
    return row.storage_key
