"""Files API tests. Shared helpers (imported as `from . import ...`)."""

from __future__ import annotations

import json
from typing import Any

CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}]}


def jsonl(*records: Any) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def upload(client: Any, name: str, data: bytes, purpose: str | None = "fine-tune") -> Any:
    """POST /v1/files as multipart; returns the TestClient response."""
    form = {"purpose": purpose} if purpose is not None else {}
    return client.post("/v1/files", files={"file": (name, data)}, data=form)


def error_of(resp: Any) -> dict[str, Any]:
    body: dict[str, Any] = resp.json()
    return body["error"]  # type: ignore[no-any-return]
