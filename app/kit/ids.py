"""Server-generated, prefixed ids (never the client's names)."""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, n: int = 24) -> str:
    return f"{prefix}-" + "".join(secrets.choice(_ALPHABET) for _ in range(n))


def file_id() -> str:
    return new_id("file")


def job_id() -> str:
    return new_id("ftjob")


def event_id() -> str:
    return new_id("ftevent")


def checkpoint_id() -> str:
    return new_id("ftckpt")


def project_id() -> str:
    return new_id("proj", 16)


def api_key_id() -> str:
    return new_id("key", 16)
