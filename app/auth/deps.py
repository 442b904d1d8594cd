"""The caller's project, from the `Authorization: Bearer <key>` header."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.auth.service import project_for_key
from app.kit.deps import DB
from app.kit.errors import AuthenticationError
from app.orm import Project


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
