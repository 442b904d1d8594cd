"""Well-formed but hostile input, refused before any handler sees it: a NUL character (Postgres cannot
store one in text) or an unpaired surrogate (not Unicode: neither Postgres, a tokenizer nor our own
JSON response can encode it) in a path parameter, query parameter, header or JSON body string.
Installed as an app-wide dependency, so the 400 names the parameter or body field, as validation
errors do. (Over-deep JSON and over-long numbers are body *parse* errors: `app.kit.errors`.)"""

from __future__ import annotations

import email.message

from fastapi import Request

from app.kit.errors import InvalidRequest
from ml.data.text import find_bad_text, text_problem  # the upload validator's own check (stdlib only)


def _reject(param: str | None, problem: str) -> InvalidRequest:
    where = f"'{param}'" if param else "the request body"
    return InvalidRequest(f"Invalid value for {where}: it {problem}.", param=param or None, code="invalid_value")


def _is_json(request: Request) -> bool:
    """The body FastAPI parsed as JSON (same content-type rule), so `request.json()` is its cached value."""
    ctype = request.headers.get("content-type")
    if not ctype:
        return False
    msg = email.message.Message()
    msg["content-type"] = ctype
    sub = msg.get_content_subtype()
    return msg.get_content_maintype() == "application" and (sub == "json" or sub.endswith("+json"))


def _check_params(request: Request) -> None:
    for name, value in request.path_params.items():
        if isinstance(value, str) and (problem := text_problem(value)):
            raise _reject(name, problem)
    for key, value in request.query_params.multi_items():
        if problem := text_problem(key):
            raise _reject(None, f"has a query parameter name that {problem}")
        if problem := text_problem(value):
            raise _reject(key, problem)
    for raw_name, raw_value in request.headers.raw:
        if b"\x00" in raw_value:
            name = "-".join(p.capitalize() for p in raw_name.decode("latin-1").split("-"))
            raise _reject(name, "contains a NUL character")


async def guard_input(request: Request) -> None:
    """App-wide dependency (runs before auth and every route's own dependencies)."""
    _check_params(request)
    route = request.scope.get("route")
    if getattr(route, "body_field", None) is None or not _is_json(request) or not await request.body():
        return
    try:
        body = await request.json()  # FastAPI's cached parse (it rejects an unparsable body itself)
    except (RecursionError, ValueError):
        return
    if found := find_bad_text(body):
        raise _reject(*found)
