"""Migrations ship inside the package (app/migrations) and run without alembic.ini, so a wheel install
migrates from any directory."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

from setuptools import find_namespace_packages

from app.kit.migrate import SCRIPTS, alembic_config

ROOT = Path(__file__).resolve().parents[2]


def test_scripts_live_in_the_package() -> None:
    assert SCRIPTS == ROOT / "app" / "migrations"
    assert (SCRIPTS / "env.py").is_file() and (SCRIPTS / "script.py.mako").is_file()
    assert sorted(p.name for p in (SCRIPTS / "versions").glob("0001_*.py"))
    assert alembic_config("sqlite://").config_file_name is None  # no ini file needed
    assert not (ROOT / "migrations").exists()


def test_the_wheel_config_includes_the_scripts() -> None:
    """setuptools finds app/migrations (and versions/) as packages, so their .py files go in the wheel;
    the .mako template is package data."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = find_namespace_packages(str(ROOT), include=tool["packages"]["find"]["include"])
    assert {"app.migrations", "app.migrations.versions"} <= set(found)
    assert "migrations/script.py.mako" in tool["package-data"]["app"]


def test_tunehouse_migrate_from_another_directory(tmp_path: Path) -> None:
    db = tmp_path / "fresh.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TUNEHOUSE_DATA_DIR": str(tmp_path / "data"),
           "TUNEHOUSE_DATABASE_URL": f"sqlite:///{db}"}
    proc = subprocess.run([sys.executable, "-c", "from app.cli import main; main()", "migrate"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "migrations applied" in proc.stdout
    heads = [p.stem.split("_")[0] for p in (SCRIPTS / "versions").glob("[0-9]*.py")]
    with sqlite3.connect(db) as conn:
        assert conn.execute("select version_num from alembic_version").fetchone()[0] == max(heads)
