"""Structured JSON logs, one configuration for every process: the API and uvicorn (`log_config`), the
Celery workers (worker/celery_app.py) and the inference worker. Ids ride along either per record
(`extra={"job_id": ...}`) or for a whole scope (`log_context(job_id=..., attempt=...)`, the request
id middleware)."""

from __future__ import annotations

import json
import logging
import logging.config
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from app.settings import Settings

_EXTRA_KEYS = ("job_id", "file_id", "model", "attempt", "worker", "request_id")
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Loggers that bring their own handlers and formats: routed to the root handler instead.
_FOREIGN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task", "celery.redirected")

_context: ContextVar[tuple[tuple[str, Any], ...]] = ContextVar("tunehouse_log_context", default=())


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Adds `fields` to every record logged in this context (this task or request, its threadpool calls)."""
    token = _context.set(tuple({**dict(_context.get()), **fields}.items()))
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_context.get())
        for key in _EXTRA_KEYS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one root handler; its presence means logging is configured."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)


def log_config(settings: Settings, level: str | int = "INFO") -> dict[str, Any]:
    """A `logging.config.dictConfig` (also uvicorn's `log_config`): one stderr handler on the root,
    JSON lines unless TUNEHOUSE_LOG_JSON=false, and uvicorn's / Celery's loggers sent through it."""
    formatter = {"()": JsonFormatter} if settings.log_json else {"format": PLAIN_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"tunehouse": formatter},
        "handlers": {"tunehouse": {"()": StderrHandler, "formatter": "tunehouse"}},
        "root": {"handlers": ["tunehouse"], "level": level},
        "loggers": {name: {"handlers": [], "propagate": True} for name in _FOREIGN_LOGGERS},
    }


def configure_logging(settings: Settings, level: str | int = "INFO") -> None:
    """Adds the root handler once (keeping any others, e.g. pytest's) and reroutes uvicorn's and
    Celery's loggers to it, whoever configured them before (`uvicorn app.main:create_app` does)."""
    root = logging.getLogger()
    if not any(isinstance(h, StderrHandler) for h in root.handlers):
        handler = StderrHandler()
        handler.setFormatter(JsonFormatter() if settings.log_json else logging.Formatter(PLAIN_FORMAT))
        root.addHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(True)  # `warnings` too (Celery's SecurityWarning): a JSON record, not raw text
    for name in _FOREIGN_LOGGERS:
        foreign = logging.getLogger(name)
        foreign.handlers.clear()
        foreign.propagate = True
