from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ModelOut(BaseModel):
    """OpenAI `model` object plus extensions describing what it can do."""

    id: str = Field(description="The model id: a catalog base model (`minilm-l6`) or a fine-tuned one (`ft:...`).")
    object: Literal["model"] = Field("model", description="Always `model`.")
    created: int = Field(description="Creation time (Unix seconds).")
    owned_by: str = Field(description="`tunehouse` for base models, the project name for fine-tuned ones.")
    # extensions
    kind: Literal["base", "fine-tuned"] = Field(description="Extension: `base` or `fine-tuned`.")
    tasks: list[str] = Field(description="Extension: tasks the model can be trained for (base) or serves (fine-tuned).")
    training_types: list[str] = Field(
        [], description="Extension: training types a base model supports (lora, full, freeze...).")
    base_model: str | None = Field(None, description="Extension: the base model of a fine-tuned model.")
    fine_tuning_job: str | None = Field(None, description="Extension: the job that produced a fine-tuned model.")
    training_type: str | None = Field(None, description="Extension: how a fine-tuned model was trained.")
    info: dict[str, Any] = Field(
        {}, description="Extension: further details (parameters, max sequence length, labels...).")


class ModelList(BaseModel):
    object: Literal["list"] = Field("list", description="Always `list`.")
    data: list[ModelOut] = Field(description="Base models of the catalog, then the project's fine-tuned models.")
    has_more: bool = Field(False, description="With `limit`: whether more fine-tuned models follow (pass "
                           "`last_id` as `after`).")
    last_id: str | None = Field(None, description="With `limit`: the id of the page's last model.")


class ModelDeleted(BaseModel):
    id: str = Field(description="The deleted model's id.")
    object: Literal["model"] = Field("model", description="Always `model`.")
    deleted: bool = Field(True, description="Always true.")
