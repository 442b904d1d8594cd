"""The one place configuration is read from the environment (prefix ``TUNEHOUSE_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEHOUSE_", env_file=".env", extra="ignore")

    env: Literal["development", "test", "production"] = "development"
    # Embedded default: SQLite + local artifact dir + a worker the server starts itself.
    data_dir: Path = Path("data")
    database_url: str = ""  # empty -> sqlite:///<data_dir>/tunehouse.db
    # Empty -> embedded mode: a filesystem broker under data_dir, no Redis needed.
    broker_url: str = ""
    artifact_url: str = ""  # empty -> <data_dir>/artifacts; s3://bucket/prefix for object storage

    # API keys: created by `tunehouse keys create`; this one is ensured at start-up when set.
    bootstrap_api_key: str = ""
    bootstrap_project: str = "default"

    # Uploads
    max_upload_bytes: int = 512 * 1024 * 1024
    max_line_bytes: int = 4 * 1024 * 1024
    max_errors_reported: int = 20

    # Durability (seconds)
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    reaper_interval_seconds: float = 15.0
    max_attempts: int = 3
    run_reaper: bool = True  # the API process runs the reaper loop (safe with many replicas)
    # Redis redelivers an unacked task after this long; it must outlive a lease.
    visibility_timeout_seconds: int = 6 * 3600
    # Training jobs of one project running at once; more wait queued. 0 -> unlimited.
    max_running_jobs_per_project: int = Field(default=0, ge=0)
    # Leftovers (app.kit.storage cleanup): staging entries and unreferenced stored objects older than
    # these are removed at start-up and every `cleanup_interval_seconds` (by the reaper).
    staging_grace_seconds: float = Field(default=3600.0, gt=0)
    orphan_grace_seconds: float = Field(default=6 * 3600.0, gt=0)
    cleanup_interval_seconds: float = Field(default=600.0, gt=0)

    # Training
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # torch intra-op threads in training, export and inference workers; 0 -> half the cores (at least 1)
    torch_threads: int = Field(default=0, ge=0)
    catalog_path: Path | None = None  # JSON base-model catalog; None -> the bundled one
    # Base models an operator registered from local directories (`tunehouse models add`); None ->
    # <data_dir>/models.json. Workers on other machines need the same file and the model dirs.
    models_file: Path | None = None
    checkpoint_every_steps: int = 0  # 0 -> once per epoch
    # Memory of one training worker's device (bytes; the smallest GPU when they differ): estimates say
    # whether a job fits and job creation refuses one that clearly does not. None -> unknown, not checked.
    worker_device_memory_bytes: int | None = Field(default=None, ge=1)
    keep_checkpoints: int = 0  # newest N (plus the best) per job; 0 -> keep all
    # Devices one training worker can give a job (`resources.devices`: processes under torchrun, one per
    # GPU, or CPU processes over gloo). A worker claims only jobs that fit its own value; the API (it
    # never imports torch, so cannot count GPUs) refuses jobs asking more than its value: set it there
    # to the GPU count of the largest worker. 2 fits any CPU worker.
    worker_devices: int = Field(default=2, ge=1)
    # Multi-node jobs (`resources.nodes`, README "Multi-GPU and multi-node workers"): the address other
    # workers reach this one's rendezvous on (empty -> this host name's address, else 127.0.0.1), how long
    # a leader waits for its followers before giving the job back (no attempt spent), the most nodes a job
    # may ask for.
    worker_address: str = ""
    gang_timeout_seconds: float = Field(default=300.0, gt=0)
    max_nodes: int = Field(default=8, ge=1)

    # Inference runs in inference workers behind this URL; embedded `serve` starts one and sets it.
    inference_url: str = ""
    # Shared secret of the inference workers' /internal API (the API sends it as a bearer token); a
    # worker without one refuses every internal call. Embedded `serve` generates one for its worker.
    internal_token: str = ""
    inference_max_batch_size: int = 32
    inference_max_wait_ms: float = 0.0  # > 0 delays lone requests to coalesce more; 0: never waits
    inference_max_adapters: int = 32
    inference_max_bases: int = 2
    inference_max_full_models: int = 2
    inference_max_input_tokens: int = 512
    inference_max_new_tokens: int = 512
    inference_timeout_seconds: float = 60.0
    serve_base_models: bool = True  # catalog causal LMs answer chat/completions as themselves

    # Webhooks
    webhook_secret: str = Field(default="", description="HMAC-SHA256 key for webhook signatures")
    webhook_max_attempts: int = 5
    # https only unless set: http sends events (and their signatures) in clear text.
    webhook_allow_http: bool = False
    # Exempt from the public-address rule (app.webhooks.urls): host names, IPs or CIDRs; env is comma-separated.
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = []

    # Tenancy (app.tenancy): defaults for every project, overridden per project with
    # `tunehouse projects limits set`. 0 -> unlimited.
    rate_limit_rpm: int = Field(default=0, ge=0)  # requests per minute per API key
    max_queued_jobs: int = Field(default=0, ge=0)  # jobs validating or queued, per project
    max_storage_bytes: int = Field(default=0, ge=0)  # bytes of live files, per project
    # Bearer token of the operator endpoints (/v1/operator/...); empty -> they are disabled.
    operator_token: str = ""

    # /metrics (job counts of every project) takes the operator token; without one it is off (404)
    # unless this is set, which serves it to anyone who can reach the port.
    metrics_public: bool = False

    log_json: bool = True

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, v: object) -> object:
        return [h.strip() for h in v.split(",") if h.strip()] if isinstance(v, str) else v

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'tunehouse.db').resolve()}"

    @property
    def embedded(self) -> bool:
        return not self.broker_url

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def resolved_models_file(self) -> Path:
        return (self.models_file or self.data_dir / "models.json").resolve()

    @property
    def resolved_artifact_url(self) -> str:
        return self.artifact_url or str((self.data_dir / "artifacts").resolve())


@lru_cache
def get_settings() -> Settings:
    return Settings()
