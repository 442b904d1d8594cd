"""Operator commands: `tunehouse projects usage` and `tunehouse projects limits show|set`. They talk to
the database directly (like `keys create`), so they run where the server's settings are."""

from __future__ import annotations

import json
import re

import typer

projects = typer.Typer(help="Operator: projects' usage, quotas and rate limits", no_args_is_help=True)
limits_app = typer.Typer(help="Per-project quotas and rate limits", no_args_is_help=True)
projects.add_typer(limits_app, name="limits")

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^(\d+)\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)
_VALUE_HELP = "0: unlimited; 'default': back to the server default"


def parse_limit(name: str, raw: str | None) -> int | None:
    """`N` (sizes may end in K/M/G/T, binary), `0` (unlimited) or `default` (None: clear the override)."""
    if raw is None or raw.strip().lower() == "default":
        return None
    m = _SIZE.match(raw.strip())
    if m is None:
        raise typer.BadParameter(f"{raw!r}: expected a number >= 0 (e.g. 100, 512M, 10G) or 'default'",
                                 param_hint=f"--{name.replace('_', '-')}")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


@limits_app.command("set")
def limits_set(
    project: str = typer.Option(..., "--project", help="project name or id"),
    rpm: str | None = typer.Option(None, help=f"requests per minute per API key ({_VALUE_HELP})"),
    max_queued_jobs: str | None = typer.Option(None, help=f"jobs validating or queued at once ({_VALUE_HELP})"),
    max_running_jobs: str | None = typer.Option(None, help=f"jobs training at once ({_VALUE_HELP})"),
    max_storage_bytes: str | None = typer.Option(None, help=f"bytes of live files ({_VALUE_HELP})"),
    max_file_bytes: str | None = typer.Option(None, help="largest upload ('default': TUNEHOUSE_MAX_UPLOAD_BYTES)"),
) -> None:
    """Set a project's limits; the options not given are left as they are. Takes effect at once."""
    from app.kit.db import session_scope
    from app.kit.errors import NotFound
    from app.tenancy import service

    given = {"rpm": rpm, "max_queued_jobs": max_queued_jobs, "max_running_jobs": max_running_jobs,
             "max_storage_bytes": max_storage_bytes, "max_file_bytes": max_file_bytes}
    changes = {k: parse_limit(k, v) for k, v in given.items() if v is not None}
    if not changes:
        raise _fail("give at least one limit to set (see --help)")
    try:
        with session_scope() as s:
            found = service.limits(service.set_limits(s, project, changes))
    except NotFound as exc:
        raise _fail(exc.message) from None
    typer.echo(_limits_line(project, found.model_dump()))


@limits_app.command("show")
def limits_show(project: str = typer.Option(..., "--project", help="project name or id")) -> None:
    """The limits in force for a project (`*`: set on the project, the rest are defaults)."""
    from app.kit.db import session_scope
    from app.kit.errors import NotFound
    from app.tenancy import service

    try:
        with session_scope() as s:
            found = service.limits(service.get_project(s, project))
    except NotFound as exc:
        raise _fail(exc.message) from None
    typer.echo(_limits_line(project, found.model_dump()))


def _limits_line(project: str, limits: dict[str, object]) -> str:
    overrides = limits.pop("overrides")
    assert isinstance(overrides, dict)
    shown = [f"{k}={v or 'unlimited'}{'*' if k in overrides else ''}" for k, v in limits.items()]
    return f"{project}: " + " ".join(shown)


@projects.command("usage")
def usage(project: str | None = typer.Option(None, "--project", help="one project (name or id); default: all"),
          as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Metered usage per project: trained tokens, device-seconds, predictions, tokens served, storage."""
    from app.kit.db import session_scope
    from app.kit.errors import NotFound
    from app.tenancy import service

    try:
        with session_scope() as s:
            rows = [service.usage(s, service.get_project(s, project))] if project else service.all_usage(s)
    except NotFound as exc:
        raise _fail(exc.message) from None
    if as_json:
        typer.echo(json.dumps([r.model_dump() for r in rows], indent=1))
        return
    typer.echo("project                  trained_tokens   device_s predictions tokens_served  stored_bytes "
               "queued running")
    for r in rows:
        typer.echo(f"{r.project:<24} {r.trained_tokens:>14} {r.device_seconds:>10.1f} {r.predictions:>11} "
                   f"{r.tokens_served:>13} {r.stored_bytes:>13} {r.queued_jobs:>6} {r.running_jobs:>7}")
