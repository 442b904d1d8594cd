"""What the API hands the engine (over HTTP to an inference worker): a resolved model, never a DB object."""

from __future__ import annotations

from pydantic import BaseModel

GENERATIVE_TASKS = ("causal_lm",)
PREDICTIVE_TASKS = ("classification", "regression", "masked_lm")
BASE_KEY_PREFIX = "base:"  # `storage_key` of a catalog base model served as itself: "base:<model id>"


class ModelRef(BaseModel):
    """A servable model: `storage_key` names its checkpoint dir; the rest is a DB-side fallback
    for what the dir's `tunehouse.json` says (the engine prefers the file)."""

    name: str  # what the caller asked for; echoed as `model` in responses
    storage_key: str
    task: str
    training_type: str | None = None
    base_model: str | None = None
    label_names: list[str] | None = None
    problem_type: str | None = None
