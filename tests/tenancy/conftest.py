"""Tenancy fixtures: settings defaults changed for one test, a project's limits set in the database."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy.orm import Session

from app.kit.hotcache import bump_after_commit
from app.orm import Project
from app.settings import Settings, get_settings


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Settings]:
    """`settings(rate_limit_rpm=3)`: the cached settings with these values for this test only."""
    def apply(**values: Any) -> Settings:
        s = get_settings()
        for name, value in values.items():
            monkeypatch.setattr(s, name, value)
        return s
    return apply


@pytest.fixture
def set_limits(db: Session) -> Callable[..., None]:
    def apply(project: Project, **limits: int | None) -> None:
        for name, value in limits.items():
            setattr(project, name, value)
        bump_after_commit(db)  # as app.tenancy.service.set_limits does: cached projects carry their limits
        db.commit()
    return apply
