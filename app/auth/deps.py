"""The caller's project, from the `Authorization: Bearer <key>` header."""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
from fastapi import Depends, Request
from sqlalchemy.orm import Session, make_transient_to_detached

from app.auth.service import hash_key, project_for_key
from app.kit import hotcache
from app.kit.deps import DB, run_db
from app.kit.errors import AuthenticationError
from app.kit.hotcache import HotCache, SingleFlight
from app.kit.openapi import ApiKeyAuth
from app.orm import Project
from app.tenancy.ratelimit import enforce_rate_limit, rpm_limit


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
        )
    return token.strip()


def authenticate(db: Session, request: Request) -> Project:
    """The key's project, or 401; the one check every authenticated request goes through."""
    token = bearer_token(request)
    project = project_for_key(db, token)
    if project is None:
        raise AuthenticationError("Incorrect API key provided.")
    enforce_rate_limit(request, project, token)  # 429 past the key's requests per minute (app.tenancy)
    return project


def get_project(request: Request, db: DB, _: ApiKeyAuth) -> Project:  # ApiKeyAuth: OpenAPI security
    return authenticate(db, request)


async def get_detached_project(request: Request, _: ApiKeyAuth) -> Project:
    """The key checked in a short session of its own, released before the endpoint runs: for async
    endpoints that wait on something slow (inference, an upload's body) and take no `DB`. The project
    comes back detached: its columns are loaded, nothing on it loads lazily. A key seen recently is
    answered from `KEYS` (see `app.kit.hotcache`) without the database or a thread: one async Redis
    read for the generation (plus the rate limit's, in a thread, when the project has one)."""
    token = bearer_token(request)  # a missing key is a 401 without touching the database
    hashed, gen = hash_key(token), await serving_generation(request)
    columns = KEYS.get(hashed, gen)
    if columns is None:
        columns = await KEY_LOOKUPS.run(hashed, lambda: run_db(request, _lookup_and_cache, token, gen))
    project = Project(**columns)
    make_transient_to_detached(project)  # a fresh instance per request, like one loaded and detached
    if rpm_limit(project) > 0:
        await anyio.to_thread.run_sync(enforce_rate_limit, request, project, token)
    return project


KEYS: HotCache[str, dict[str, Any]] = HotCache()  # sha256 of the key -> the project's columns
KEY_LOOKUPS: SingleFlight[str, dict[str, Any]] = SingleFlight()


async def serving_generation(request: Request) -> tuple[str, float] | None:
    """The generation this request reads under: read once (a Redis round trip), kept on the request."""
    if not hasattr(request.state, "serving_generation"):
        request.state.serving_generation = await hotcache.generation_async()
    gen: tuple[str, float] | None = request.state.serving_generation
    return gen


def _lookup_and_cache(db: Session, token: str, gen: tuple[str, float] | None) -> dict[str, Any]:
    """The key's project columns, cached under `gen` (read before the database: see app.kit.hotcache).
    The rate limit is the caller's: each request counts, whichever of them looked the key up."""
    project = project_for_key(db, token)
    if project is None:
        raise AuthenticationError("Incorrect API key provided.")
    columns = {c.key: getattr(project, c.key) for c in Project.__table__.columns}
    KEYS.put(hash_key(token), gen, columns)
    return columns


CurrentProject = Annotated[Project, Depends(get_project, scope="function")]
DetachedProject = Annotated[Project, Depends(get_detached_project)]
