"""`tunehouse projects limits set|show` and `tunehouse projects usage`, against the database."""

from __future__ import annotations

import json

import pytest
import typer
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from app.auth.service import get_or_create_project
from app.cli import app as cli_app
from app.orm import Project
from app.tenancy import service
from app.tenancy.cli import parse_limit


def _run(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli_app, list(args), env={"COLUMNS": "250"})
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    return result.output


def test_limits_set_show_and_usage(committed_db: sessionmaker[Session]) -> None:
    with committed_db() as s:
        project_id = get_or_create_project(s, "cli-limits").id
        service.add_usage(s, project_id, predictions=7, tokens_served=70, device_seconds=12.5, trained_tokens=900)
        s.commit()
    out = _run("projects", "limits", "set", "--project", "cli-limits", "--rpm", "120", "--max-queued-jobs", "5",
               "--max-running-jobs", "2", "--max-storage-bytes", "10G", "--max-file-bytes", "512M")
    assert "rpm=120*" in out and "max_storage_bytes=10737418240*" in out and "max_file_bytes=536870912*" in out
    with committed_db() as s:
        p = s.get(Project, project_id)
        assert p is not None
        assert (p.rpm_limit, p.max_queued_jobs, p.max_running_jobs) == (120, 5, 2)
        assert (p.max_storage_bytes, p.max_file_bytes) == (10 << 30, 512 << 20)
    _run("projects", "limits", "set", "--project", project_id, "--rpm", "default", "--max-queued-jobs", "0")
    out = _run("projects", "limits", "show", "--project", "cli-limits")
    assert "rpm=unlimited " in out and "max_queued_jobs=unlimited*" in out and "max_running_jobs=2*" in out
    table = _run("projects", "usage")
    line = next(x for x in table.splitlines() if x.startswith("cli-limits"))
    assert line.split()[1:5] == ["900", "12.5", "7", "70"]
    data = json.loads(_run("projects", "usage", "--project", "cli-limits", "--json"))
    assert data[0]["predictions"] == 7 and data[0]["limits"]["max_running_jobs"] == 2


def test_errors(committed_db: sessionmaker[Session]) -> None:
    assert "No project" in _run("projects", "limits", "set", "--project", "nope", "--rpm", "1", code=2)
    assert "give at least one limit" in _run("projects", "limits", "set", "--project", "nope", code=2)
    assert "No project" in _run("projects", "usage", "--project", "nope", code=2)
    _run("projects", "limits", "set", "--project", "nope", "--rpm", "-3", code=2)


def test_parse_limit() -> None:
    assert [parse_limit("x", v) for v in ("0", "100", "2K", "512MiB", "1gb", "default", None)] == \
        [0, 100, 2048, 512 << 20, 1 << 30, None, None]
    with pytest.raises(typer.BadParameter):
        parse_limit("rpm", "ten")
