"""`tunehouse` command line: run the server and workers, manage keys. User commands (upload,
jobs, follow, predict) live in app/cli_user.py and are mounted here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from app.tenancy.cli import projects

app = typer.Typer(help="tunehouse: self-hosted fine-tuning service", no_args_is_help=True)
keys = typer.Typer(help="API keys")
app.add_typer(keys, name="keys")
app.add_typer(projects, name="projects")  # operator: usage, quotas and rate limits (app/tenancy/cli.py)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="bind address"),
    port: int = typer.Option(8000, help="port"),
    worker: bool = typer.Option(None, help="start a worker too (default: yes in embedded mode)"),
) -> None:
    """Run the API (migrations first). Embedded mode (no TUNEHOUSE_BROKER_URL) also runs and supervises
    a training worker, a default-queue worker and an inference worker."""
    import uvicorn

    from app.kit.logging import configure_logging, log_config
    from app.server import SupervisedWorker, embedded_children, exit_on_sigterm, prepare
    from app.settings import get_settings

    settings = get_settings()
    configure_logging(settings)  # JSON lines from the first one (migrations) on
    key = prepare(settings)
    mode = "embedded (SQLite + filesystem broker)" if settings.embedded else "production"
    typer.echo(f"tunehouse {mode}: database {settings.resolved_database_url.split('@')[-1]}, "
               f"artifacts {settings.resolved_artifact_url}")
    if key and settings.embedded:
        typer.echo(f"API key (saved in {settings.data_dir / 'api_key'}): {key}\n"
                   f"  export OPENAI_BASE_URL=http://{host}:{port}/v1 OPENAI_API_KEY={key}")
    supervisors: list[SupervisedWorker] = []
    if worker if worker is not None else settings.embedded:
        supervisors = [SupervisedWorker(cmd) for cmd in embedded_children(settings)]
        for sup in supervisors:
            sup.start()
    exit_on_sigterm()
    try:
        uvicorn.run("app.main:create_app", factory=True, host=host, port=port, log_level="info",
                    log_config=log_config(settings))
    finally:
        for sup in supervisors:
            sup.stop()


@app.command("worker")
def run_worker(
    queues: str = typer.Option("training,default", help="comma-separated queues"),
    concurrency: int = typer.Option(1, help="training: one job per GPU (one per worker on CPU)"),
) -> None:
    """Run a Celery worker (exec)."""
    from app.server import worker_command

    cmd = worker_command(queues, concurrency)
    os.execv(sys.executable, cmd)


@app.command()
def migrate() -> None:
    """Apply database migrations."""
    from app.kit.migrate import upgrade_head
    from app.settings import get_settings

    upgrade_head(get_settings().resolved_database_url)
    typer.echo("migrations applied")


@keys.command("create")
def keys_create(project: str = typer.Option("default", help="project name"),
                name: str = typer.Option("", help="label for the key")) -> None:
    """Create an API key for a project (the project is created if needed). Shown once."""
    from app.auth.service import create_api_key, get_or_create_project
    from app.kit.db import session_scope

    with session_scope() as s:
        key = create_api_key(s, get_or_create_project(s, project), name)
    typer.echo(key)


@keys.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by id or prefix."""
    from app.auth.service import revoke_key
    from app.kit.db import session_scope

    with session_scope() as s:
        typer.echo(f"revoked {revoke_key(s, key_id)} key(s)")


def add_model(
    path: Path = typer.Option(..., "--path", help="a local transformers model directory (safetensors)"),
    model_id: str = typer.Option(..., "--id", help="the id users pass as `model`"),
    description: str = typer.Option("", help="shown in /v1/models"),
    max_seq_length: int = typer.Option(0, help="training/inference length cap (0: the model's, at most 2048)"),
) -> None:
    """Operator: register a local model directory as a base model (validated: safetensors only, a known
    architecture, no remote code). Written to the models file on this machine; no server restart."""
    from app.kit.errors import TunehouseError
    from app.models_registry.catalog import register_model
    from ml.errors import InputError
    from ml.models.base import BaseModelSpec
    from ml.models.local import inspect_model_dir

    try:
        found = inspect_model_dir(path)
    except InputError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    limit = min(found.max_positions, max_seq_length or 2048)
    spec = BaseModelSpec(
        id=model_id, description=description or f"{found.model_type} model from {path.resolve()}",
        source=f"path:{path.resolve()}", architecture=found.architecture, tasks=found.tasks,
        # QLoRA (4-bit base) is offered for decoders only: it trains causal LMs.
        training_types=["lora", "full", "freeze", "prompt_tuning", *(["qlora"] if "causal_lm" in found.tasks else [])],
        max_seq_length=limit,
        lora_target_modules=found.lora_target_modules, pretrained_heads=found.pretrained_heads)
    try:
        register_model(spec)
    except TunehouseError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"registered {model_id}: {found.architecture} ({found.model_type}), tasks {', '.join(found.tasks)}, "
               f"max_seq_length {limit}" + ("" if found.has_chat_template else "; no chat template"))


def remove_model(model_id: str = typer.Argument(..., help="a registered model id")) -> None:
    """Operator: unregister a model added with `models add` (its directory is left alone)."""
    from app.kit.errors import TunehouseError
    from app.models_registry.catalog import unregister_model

    try:
        unregister_model(model_id)
    except TunehouseError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"removed {model_id}")


def main() -> None:
    from app.cli_user import models_app, register

    register(app)
    models_app.command("add")(add_model)
    models_app.command("remove")(remove_model)
    app()


if __name__ == "__main__":
    main()
