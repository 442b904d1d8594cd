"""The OpenAPI document as the server really behaves: bearer security on the operations that need a
key, and the error responses it sends (OpenAI's error shape, a 400 for validation errors) in place of
FastAPI's 422. Domain-free: authenticating dependencies declare `ApiKeyAuth` / `OperatorAuth`, and
the app says which operations can conflict (409) or be too large (413)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

# Declared by the authenticating dependencies (they still read and check the header themselves):
# FastAPI then marks their operations with the scheme, which is what Swagger's Authorize button uses.
API_KEY = HTTPBearer(scheme_name="ApiKey", auto_error=False,
                     description="An API key (`tunehouse keys create`): `Authorization: Bearer <key>`.")
OPERATOR_TOKEN = HTTPBearer(scheme_name="OperatorToken", auto_error=False,
                            description="The operator token (TUNEHOUSE_OPERATOR_TOKEN).")
ApiKeyAuth = Annotated[HTTPAuthorizationCredentials | None, Depends(API_KEY)]
OperatorAuth = Annotated[HTTPAuthorizationCredentials | None, Depends(OPERATOR_TOKEN)]

ERROR_REF = "#/components/schemas/ErrorResponse"
_NULLABLE_STRING = [{"type": "string"}, {"type": "null"}]
ERROR_SCHEMAS: dict[str, Any] = {
    "ErrorObject": {
        "type": "object",
        "description": "What went wrong, where.",
        "properties": {
            "message": {"type": "string", "description": "Human-readable explanation."},
            "type": {"type": "string", "description": "Error class: invalid_request_error or server_error."},
            "param": {"anyOf": _NULLABLE_STRING,
                      "description": "The offending parameter or body field (for uploads, the file line)."},
            "code": {"anyOf": _NULLABLE_STRING,
                     "description": "Machine-readable code, e.g. not_found, invalid_value, rate_limit_exceeded."},
        },
        "required": ["message", "type", "param", "code"],
    },
    "ErrorResponse": {
        "type": "object",
        "description": "Every error, in the OpenAI shape.",
        "properties": {"error": {"$ref": "#/components/schemas/ErrorObject", "description": "The error."}},
        "required": ["error"],
    },
}
ERROR_DESCRIPTIONS = {
    "400": "Invalid request: a parameter or body field is missing or wrong (`param` names it).",
    "401": "Missing or incorrect bearer token.",
    "403": "Forbidden (operator endpoints: disabled until TUNEHOUSE_OPERATOR_TOKEN is set).",
    "404": "No such object in the caller's project.",
    "409": "The object is not in a state that allows this (e.g. a job that already finished).",
    "413": "The upload is larger than the limit.",
    "415": "Not a multipart/form-data upload.",
    "429": "Rate limit or quota exceeded (`Retry-After` says when to retry).",
    "503": "A dependency (database, inference worker) is unavailable; retry later.",
    "504": "The inference worker did not answer in time.",
}
Operation = tuple[str, str]  # (METHOD, path), e.g. ("POST", "/v1/files")


def _error_statuses(op: dict[str, Any], key: Operation, extra: dict[Operation, tuple[str, ...]]) -> list[str]:
    scheme = next(iter(op["security"][0]), None) if op.get("security") else None
    params = op.get("parameters", [])
    statuses = []
    if params or "requestBody" in op or scheme:
        statuses.append("400")
    if scheme:
        statuses += ["401", "429"] if scheme != "OperatorToken" else ["401", "403"]
    if any(p.get("in") == "path" for p in params):
        statuses.append("404")
    return statuses + list(extra.get(key, ()))


def _document(spec: dict[str, Any], extra: dict[Operation, tuple[str, ...]]) -> None:
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            for status in _error_statuses(op, (method.upper(), path), extra):
                responses.setdefault(status, {"description": ERROR_DESCRIPTIONS[status],
                                              "content": {"application/json": {"schema": {"$ref": ERROR_REF}}}})
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.update(ERROR_SCHEMAS)


def install_openapi(app: FastAPI, extra_errors: dict[Operation, tuple[str, ...]]) -> None:
    """`extra_errors`: the operation-specific statuses (409, 413, 503...) beyond the generic ones."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description,
                               routes=app.routes, tags=app.openapi_tags, servers=app.servers)
            _document(spec, extra_errors)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
