"""One error hierarchy, rendered in the OpenAI shape by one handler. The torch library's own errors
(`ml.errors`, which knows nothing of HTTP) are rendered through it too: an `InputError` is a 400."""

from __future__ import annotations

import logging
import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.kit.dbretry import is_transient
from ml.errors import InputError, MLError

log = logging.getLogger(__name__)


class TunehouseError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = None
    headers: dict[str, str] | None = None  # sent with the error (e.g. Retry-After)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(TunehouseError):
    status_code = 400
    type = "invalid_request_error"


class AuthenticationError(TunehouseError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(TunehouseError):
    status_code = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(TunehouseError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(TunehouseError):
    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(TunehouseError):
    status_code = 413
    type = "invalid_request_error"
    code = "file_too_large"


class UnsupportedMediaType(TunehouseError):
    status_code = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class ServiceUnavailable(TunehouseError):
    status_code = 503
    type = "server_error"
    code = "service_unavailable"


class GatewayTimeout(TunehouseError):
    status_code = 504
    type = "server_error"
    code = "timeout"


def as_tunehouse_error(exc: BaseException, fallback: str) -> TunehouseError:
    """The error a client sees: ours as is, the library's mapped (input -> 400), anything else a
    generic 500 that leaks no internals."""
    if isinstance(exc, TunehouseError):
        return exc
    if isinstance(exc, InputError):
        return InvalidRequest(exc.message, param=exc.param, code=exc.code)
    if isinstance(exc, MLError):
        return TunehouseError(exc.message, code=exc.code)
    return TunehouseError(fallback)


_PRIMITIVES = {"int", "float", "str", "bool", "list", "dict", "none", "literal"}


def _is_union_tag(part: str) -> bool:
    """pydantic names the union member in `loc` (int, literal['auto'], TrainingTypeIn...)."""
    return part in _PRIMITIVES or "[" in part or "(" in part or part[:1].isupper()


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    parts = [p for p in parts if not _is_union_tag(p)]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or None


def _body_parse_error(cause: BaseException | None) -> InvalidRequest | None:
    """FastAPI turns any JSON body parse failure but a syntax error into a bare 400: say what it was."""
    if isinstance(cause, RecursionError):
        message = "The request body is nested too deeply."
    elif isinstance(cause, UnicodeDecodeError):
        message = "The request body is not valid UTF-8."
    elif isinstance(cause, ValueError) and "digits" in str(cause):
        message = f"A number in the request body has too many digits (at most {sys.get_int_max_str_digits()})."
    else:
        return None
    return InvalidRequest(message, code="invalid_json")


DB_RETRY_AFTER_S = 5  # a database blip (failover, restart) usually lasts seconds


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TunehouseError)
    async def _tunehouse(_: Request, exc: TunehouseError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(MLError)
    async def _ml(_: Request, exc: MLError) -> JSONResponse:
        err = as_tunehouse_error(exc, "")
        return JSONResponse(err.body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors()) or [{"loc": (), "msg": "invalid request"}]
        param = _loc_to_param(tuple(errors[0].get("loc", ())))
        # A union field fails once per member: report them together.
        msgs = [str(e.get("msg")) for e in errors if _loc_to_param(tuple(e.get("loc", ()))) == param]
        msg = " or ".join(dict.fromkeys(msgs))
        message = f"Invalid value for '{param}': {msg}" if param else msg
        err = InvalidRequest(message, param=param, code="invalid_value")
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and (parse_err := _body_parse_error(exc.__cause__)) is not None:
            return JSONResponse(parse_err.body(), status_code=400)
        err = TunehouseError(str(exc.detail))
        err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        err.code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(DataError)
    async def _data(_: Request, exc: DataError) -> JSONResponse:
        # Postgres refused a value (NUL in text, a number out of range...): the input's fault.
        log.warning("database refused a value: %s", exc.orig)
        err = InvalidRequest("A value in the request cannot be stored (invalid text or a number out of "
                             "range).", code="invalid_value")
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeout)
    async def _database(_: Request, exc: Exception) -> JSONResponse:
        if not is_transient(exc):
            return await _unhandled(_, exc)
        # The database is down or dropped the connection: a client should come back, not give up.
        log.warning("database unavailable: %s: %s", type(exc).__name__, getattr(exc, "orig", exc))
        err = ServiceUnavailable("The service is temporarily unavailable (its database cannot be reached); "
                                 "retry shortly.", code="database_unavailable")
        return JSONResponse(err.body(), status_code=503, headers={"Retry-After": str(DB_RETRY_AFTER_S)})

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(TunehouseError("The server had an error processing your request.").body(), 500)
