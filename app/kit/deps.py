"""Request dependency: the DB session, committed or rolled back at the request boundary. (The caller's
project is `app.auth.deps.CurrentProject`: kit imports no domain.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.kit.db import get_sessionmaker, session_scope


def get_db(request: Request) -> Iterator[Session]:
    with session_scope(getattr(request.app.state, "sessionmaker", None) or get_sessionmaker()) as session:
        yield session


# scope="function": commit runs when the endpoint returns, before the response is sent.
DB = Annotated[Session, Depends(get_db, scope="function")]
