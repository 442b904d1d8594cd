"""Operator endpoints (`/v1/operator/...`): a project's usage and the limits in force. They take the
operator token (TUNEHOUSE_OPERATOR_TOKEN), never an API key, and are off while it is unset."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, Request

from app.kit.deps import DB
from app.kit.errors import AuthenticationError, PermissionDenied
from app.kit.openapi import OperatorAuth
from app.settings import get_settings
from app.tenancy import service
from app.tenancy.schemas import UsageOut


def require_operator(request: Request, _: OperatorAuth) -> None:  # OperatorAuth: OpenAPI security
    expected = get_settings().operator_token
    if not expected:
        raise PermissionDenied("Operator endpoints are disabled: the operator must set TUNEHOUSE_OPERATOR_TOKEN.",
                               code="operator_disabled")
    scheme, _sep, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise AuthenticationError("This endpoint needs the operator token as 'Authorization: Bearer <token>'.",
                                  code="invalid_operator_token")


router = APIRouter(prefix="/operator", tags=["operator"], dependencies=[Depends(require_operator)])


@router.get("/projects/{project_id}/usage")
def project_usage(project_id: str, db: DB) -> UsageOut:
    """Metered usage of a project (by id or name) and the limits in force for it."""
    return service.usage(db, service.get_project(db, project_id))
