"""Projects and their API keys. Keys are hashed at rest (sha256: they are 192-bit random)."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.kit import ids
from app.kit.db import utcnow
from app.kit.hotcache import bump_after_commit
from app.orm import ApiKey, Project

KEY_PREFIX = "th-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_project(session: Session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        project = Project(id=ids.project_id(), name=name)
        session.add(project)
        session.flush()
    return project


def create_api_key(session: Session, project: Project, name: str = "", key: str | None = None) -> str:
    """Create a key for the project and return it; only its hash is stored."""
    key = key or KEY_PREFIX + secrets.token_urlsafe(24)
    existing = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if existing is not None:
        if existing.project_id != project.id:
            raise ValueError("that key already belongs to another project")
        return key
    session.add(ApiKey(id=ids.api_key_id(), project_id=project.id, name=name,
                       key_hash=hash_key(key), prefix=key[:7]))
    session.flush()
    return key


def project_for_key(session: Session, key: str) -> Project | None:
    row = session.scalar(
        select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )
    return row.project if row is not None else None


def revoke_key(session: Session, prefix_or_id: str) -> int:
    rows = session.scalars(
        select(ApiKey).where((ApiKey.id == prefix_or_id) | (ApiKey.prefix == prefix_or_id))
    ).all()
    for row in rows:
        row.revoked_at = utcnow()
    session.flush()
    bump_after_commit(session)  # cached keys: the next request anywhere reads the key again
    return len(rows)
