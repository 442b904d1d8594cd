"""The OpenAPI document is complete (security, errors, upload body, descriptions) and true: real
responses of the app validate against the schema documented for their status. And /docs, /redoc
load only the server's own assets."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.spec_check import check_response as check

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "qa_json.jsonl"


@pytest.fixture
def spec(app: FastAPI) -> dict[str, Any]:
    return app.openapi()


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, op) for path, ops in spec["paths"].items() for method, op in ops.items()]


def test_authenticated_operations_declare_bearer_security(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {"type": "http", "scheme": "bearer", "description": schemes["ApiKey"]["description"]}
    for method, path, op in _operations(spec):
        if path.startswith("/v1/operator/"):
            assert op["security"] == [{"OperatorToken": []}], (method, path)
        elif path.startswith("/v1/"):
            assert op["security"] == [{"ApiKey": []}], (method, path)
            assert {"401", "429"} <= set(op["responses"]), (method, path)
        else:
            assert "security" not in op, (method, path)


def test_errors_are_documented_as_the_server_sends_them(spec: dict[str, Any]) -> None:
    error = spec["components"]["schemas"]["ErrorObject"]
    assert set(error["required"]) == {"message", "type", "param", "code"}
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for method, path, op in _operations(spec):
        assert "422" not in op["responses"], (method, path)
        for status, response in op["responses"].items():
            if status.startswith("4"):
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)
        if any(p["in"] == "path" for p in op.get("parameters", [])):
            assert "404" in op["responses"], (method, path)
        if op.get("parameters") or "requestBody" in op:
            assert "400" in op["responses"], (method, path)
    assert "409" in spec["paths"]["/v1/fine_tuning/jobs/{job_id}/cancel"]["post"]["responses"]
    assert "413" in spec["paths"]["/v1/files"]["post"]["responses"]


def test_upload_has_a_multipart_body(spec: dict[str, Any]) -> None:
    body = spec["paths"]["/v1/files"]["post"]["requestBody"]
    schema = body["content"]["multipart/form-data"]["schema"]
    assert body["required"] and set(schema["required"]) == {"file", "purpose"}
    assert schema["properties"]["file"]["format"] == "binary"
    assert schema["properties"]["purpose"]["enum"] == ["fine-tune"]


def _schemas_with_properties(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in spec["components"]["schemas"].items() if "properties" in s}


def test_every_schema_property_is_described(spec: dict[str, Any]) -> None:
    missing = [f"{name}.{prop}" for name, schema in _schemas_with_properties(spec).items()
               for prop, sub in schema["properties"].items() if not sub.get("description")]
    assert missing == []


def test_main_request_bodies_have_examples(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    for name in ("JobCreate", "ChatCompletionRequest", "CompletionRequest", "PredictionRequest"):
        examples = schemas[name]["examples"]
        assert examples and all(set(schemas[name].get("required", [])) <= set(e) for e in examples), name


# --- real responses against the document --------------------------------------------------------

def test_responses_validate_against_the_document(client: TestClient, spec: dict[str, Any]) -> None:
    with SAMPLE.open("rb") as fh:
        r = client.post("/v1/files", files={"file": ("qa.jsonl", fh)}, data={"purpose": "fine-tune"})
    file_id = check(spec, "POST", "/v1/files", r, 200)["id"]
    check(spec, "GET", "/v1/files", client.get("/v1/files"), 200)
    check(spec, "GET", "/v1/files/{file_id}", client.get(f"/v1/files/{file_id}"), 200)
    check(spec, "GET", "/v1/files/{file_id}", client.get("/v1/files/file-nope"), 404)
    r = client.post("/v1/files", files={"file": ("qa.jsonl", b"{}\n")}, data={"purpose": "nope"})
    check(spec, "POST", "/v1/files", r, 400)

    body = {"model": "tiny-lm", "training_file": file_id, "hyperparameters": {"n_epochs": 1}}
    job = check(spec, "POST", "/v1/fine_tuning/jobs", client.post("/v1/fine_tuning/jobs", json=body), 200)
    job_path = "/v1/fine_tuning/jobs/{job_id}"
    check(spec, "GET", "/v1/fine_tuning/jobs", client.get("/v1/fine_tuning/jobs"), 200)
    check(spec, "GET", job_path, client.get(f"/v1/fine_tuning/jobs/{job['id']}"), 200)
    check(spec, "GET", f"{job_path}/events", client.get(f"/v1/fine_tuning/jobs/{job['id']}/events"), 200)
    check(spec, "GET", f"{job_path}/checkpoints", client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints"), 200)
    check(spec, "POST", f"{job_path}/cancel", client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel"), 200)
    check(spec, "POST", f"{job_path}/cancel", client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel"), 409)
    check(spec, "GET", job_path, client.get("/v1/fine_tuning/jobs/ftjob-nope"), 404)
    missing = {**body, "training_file": "file-nope"}
    check(spec, "POST", "/v1/fine_tuning/jobs", client.post("/v1/fine_tuning/jobs", json=missing), 404)
    bad = {**body, "hyperparameters": {"n_epochs": 0}}
    check(spec, "POST", "/v1/fine_tuning/jobs", client.post("/v1/fine_tuning/jobs", json=bad), 400)

    check(spec, "GET", "/v1/models", client.get("/v1/models"), 200)
    check(spec, "GET", "/v1/models/{model}", client.get("/v1/models/tiny-lm"), 200)
    check(spec, "GET", "/v1/models/{model}", client.get("/v1/models/nope"), 404)
    check(spec, "GET", "/v1/files", client.get("/v1/files", headers={"Authorization": "Bearer wrong"}), 401)


# --- offline docs -------------------------------------------------------------------------------

@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_load_only_local_assets(client: TestClient, page: str) -> None:
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = re.findall(r'(?:src|href|spec-url)="([^"]+)"', r.text) + re.findall(r"url: '([^']+)'", r.text)
    assert len(urls) >= 3, r.text
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} from elsewhere"
        assert client.get(url).status_code == 200, url
    assert "cdn" not in r.text.lower()
