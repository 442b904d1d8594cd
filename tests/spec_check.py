"""Validate a real response against the app's own OpenAPI document."""

from __future__ import annotations

from typing import Any

import jsonschema_rs


def check_response(spec: dict[str, Any], method: str, path: str, response: Any, status: int) -> dict[str, Any]:
    """`response` has `status`, which `path` documents, and its JSON body validates against that schema."""
    assert response.status_code == status, response.text
    documented = spec["paths"][path][method.lower()]["responses"]
    assert str(status) in documented, f"{method} {path} answered an undocumented {status}"
    schema = documented[str(status)]["content"]["application/json"]["schema"]
    validator = jsonschema_rs.Draft202012Validator({**schema, "components": spec["components"]})
    body = response.json()
    errors = [f"{e.instance_path}: {e.message}" for e in validator.iter_errors(body)]
    assert errors == [], f"{method} {path} {status}: {errors}"
    return dict(body)
