from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from app.auth.deps import CurrentProject
from app.inference.runtime import evict_model
from app.kit.deps import DB
from app.models_registry import service
from app.models_registry.schemas import ModelDeleted, ModelList, ModelOut

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(db: DB, project: CurrentProject) -> ModelList:
    return ModelList(data=service.list_models(db, project))


@router.get("/{model:path}", response_model=ModelOut)
def retrieve_model(model: str, db: DB, project: CurrentProject) -> ModelOut:
    return service.get_model(db, project, model)


@router.delete("/{model:path}", response_model=ModelDeleted)
async def delete_model(request: Request, model: str, db: DB, project: CurrentProject) -> ModelDeleted:
    storage_key = await run_in_threadpool(service.delete_model, db, project, model)  # not on the event loop
    await evict_model(request.app, storage_key)  # free the weights now, not on the next request
    return ModelDeleted(id=model)
