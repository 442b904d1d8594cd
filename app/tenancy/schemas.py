"""Operator views of a project: its limits in force and its metered usage."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

# Names of the per-project limits (CLI options, `overrides` keys); `rpm` is the `rpm_limit` column.
LIMIT_FIELDS = ("rpm", "max_queued_jobs", "max_running_jobs", "max_storage_bytes", "max_file_bytes")


class LimitsOut(BaseModel):
    rpm: int = Field(description="requests per minute per API key; 0: unlimited")
    max_queued_jobs: int = Field(description="jobs validating or queued at once; 0: unlimited")
    max_running_jobs: int = Field(description="jobs training at once; 0: unlimited")
    max_storage_bytes: int = Field(description="bytes of live files; 0: unlimited")
    max_file_bytes: int = Field(description="largest upload")
    overrides: dict[str, int] = Field(description="limits set on this project (the rest are the defaults)")


class UsageOut(BaseModel):
    object: Literal["project.usage"] = Field("project.usage", description="Always `project.usage`.")
    project_id: str = Field(description="The project's id.")
    project: str = Field(description="The project's name.")
    trained_tokens: int = Field(description="tokens trained by the project's succeeded jobs")
    device_seconds: float = Field(description="training attempts' wall time x devices")
    predictions: int = Field(description="inputs predicted and completions generated")
    tokens_served: int = Field(description="prompt + completion tokens of inference requests")
    stored_bytes: int = Field(description="Bytes of the project's live files.")
    queued_jobs: int = Field(description="Jobs validating or queued now.")
    running_jobs: int = Field(description="Jobs training now.")
    limits: LimitsOut = Field(description="The limits in force for the project.")
