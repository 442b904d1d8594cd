"""What the OpenAPI document needs to know about the domains: the operations that can answer 409 /
413 / 415 / 503, or 404 for an id in their body (app.kit.openapi adds the generic 400, 401, 403, 429,
and 404 for path ids, itself)."""

from __future__ import annotations

from fastapi import FastAPI

from app.kit.docs import install_docs
from app.kit.openapi import install_openapi

_JOB = "/v1/fine_tuning/jobs/{job_id}"
# unknown model; the model's job is still running; no inference worker reachable / it timed out
_INFERENCE = ("404", "409", "503", "504")
EXTRA_ERRORS = {
    ("POST", "/v1/files"): ("413", "415"),
    ("DELETE", "/v1/files/{file_id}"): ("409",),  # used by an unfinished job
    ("POST", "/v1/fine_tuning/jobs"): ("404", "409"),  # no such file / checkpoint; Idempotency-Key reused
    ("POST", "/v1/fine_tuning/estimate"): ("404",),
    ("POST", f"{_JOB}/cancel"): ("409",),
    ("POST", f"{_JOB}/pause"): ("409",),
    ("POST", f"{_JOB}/resume"): ("409",),
    ("POST", "/v1/chat/completions"): _INFERENCE,
    ("POST", "/v1/completions"): _INFERENCE,
    ("POST", "/v1/predictions"): _INFERENCE,
}


def document_api(app: FastAPI) -> None:
    """Offline /docs and /redoc, and the completed OpenAPI document (create the app without docs_url)."""
    install_docs(app)
    install_openapi(app, EXTRA_ERRORS)
