"""Run Alembic migrations programmatically (server start, `tunehouse migrate`, compose `api` service, tests).

The scripts ship inside the package (app/migrations), and the config is built here rather than read from
alembic.ini, so a wheel install migrates from any directory. The root alembic.ini is for developers'
`alembic revision --autogenerate` and points at the same scripts."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

SCRIPTS = Path(__file__).resolve().parents[1] / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade_head(url: str) -> None:
    command.upgrade(alembic_config(url), "head")
