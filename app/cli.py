"""`tunehouse` command line: run the server and workers, manage keys. User commands (upload,
jobs, follow, predict) live in app/cli_user.py and are mounted here."""

from __future__ import annotations

import os
import sys

import typer

app = typer.Typer(help="tunehouse: self-hosted fine-tuning service", no_args_is_help=True)
keys = typer.Typer(help="API keys")
app.add_typer(keys, name="keys")


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="bind address"),
    port: int = typer.Option(8000, help="port"),
    worker: bool = typer.Option(None, help="start a worker too (default: yes in embedded mode)"),
) -> None:
    """Run the API (migrations first). Embedded mode (no TUNEHOUSE_BROKER_URL) also runs and supervises
    a training worker, a default-queue worker and an inference worker."""
    import uvicorn

    from app.server import SupervisedWorker, embedded_children, prepare
    from app.settings import get_settings

    settings = get_settings()
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
    try:
        uvicorn.run("app.main:create_app", factory=True, host=host, port=port, log_level="info")
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


def main() -> None:
    from app.cli_user import register

    register(app)
    app()


if __name__ == "__main__":
    main()
