from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class ModelOut(BaseModel):
    """OpenAI `model` object plus extensions describing what it can do."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # extensions
    kind: Literal["base", "fine-tuned"]
    tasks: list[str]
    training_types: list[str] = []
    base_model: str | None = None
    fine_tuning_job: str | None = None
    training_type: str | None = None
    info: dict[str, Any] = {}


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True
