"""Request dependencies: the DB session (commit/rollback at the boundary) and the caller's project."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.auth.service import project_for_key
from app.kit.db import get_sessionmaker, session_scope
from app.kit.errors import AuthenticationError
from app.orm import Project


def get_db(request: Request) -> Iterator[Session]:
    with session_scope(getattr(request.app.state, "sessionmaker", None) or get_sessionmaker()) as session:
        yield session


# scope="function": commit runs when the endpoint returns, before the response is sent.
DB = Annotated[Session, Depends(get_db, scope="function")]


def get_project(request: Request, db: DB) -> Project:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
        )
    project = project_for_key(db, token.strip())
    if project is None:
        raise AuthenticationError("Incorrect API key provided.")
    return project


CurrentProject = Annotated[Project, Depends(get_project, scope="function")]
