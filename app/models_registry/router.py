from __future__ import annotations

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from app.auth.deps import CurrentProject
from app.inference.runtime import evict_model
from app.kit.deps import DB
from app.models_registry import service
from app.models_registry.schemas import ModelDeleted, ModelList, ModelOut

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(
    db: DB, project: CurrentProject,
    limit: int | None = Query(None, description=f"1..{service.MAX_LIST_LIMIT}: page through the fine-tuned "
                              "models (newest first) instead of listing them all; the first page also "
                              "carries the catalog's base models."),
    after: str | None = Query(None, description="A fine-tuned model id: the page after it (needs `limit`)."),
) -> ModelList:
    if limit is None and after is None:  # OpenAI's shape: everything, one response (cost grows with the count)
        return ModelList(data=service.list_models(db, project))
    size = service.MAX_LIST_LIMIT if limit is None else limit
    data, has_more = service.list_models_page(db, project, after=after, limit=size)
    return ModelList(data=data, has_more=has_more, last_id=data[-1].id if data else None)


@router.get("/{model:path}", response_model=ModelOut)
def retrieve_model(model: str, db: DB, project: CurrentProject) -> ModelOut:
    return service.get_model(db, project, model)


@router.delete("/{model:path}", response_model=ModelDeleted)
async def delete_model(request: Request, model: str, db: DB, project: CurrentProject) -> ModelDeleted:
    storage_key = await run_in_threadpool(service.delete_model, db, project, model)  # not on the event loop
    await evict_model(request.app, storage_key)  # free the weights now, not on the next request
    return ModelDeleted(id=model)
