"""Riding out short database outages: which errors are transient (the connection, not the statement),
and a retry with backoff that runs each try in a fresh session (the failed one is rolled back)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from app.kit.db import session_scope

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    """The database was unreachable or dropped the connection (or the pool had none to give): trying
    again later can succeed. Constraint or data errors are not transient."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def retry_transient(fn: Callable[[], T], *, budget_s: float, what: str, first_delay_s: float = 0.2,
                    max_delay_s: float = 5.0) -> T:
    """`fn()`, tried again with exponential backoff while it fails transiently and `budget_s` lasts;
    then the last error is raised."""
    deadline = time.monotonic() + budget_s
    delay, tries = first_delay_s, 1
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("database unavailable during %s (try %d, %s); retrying in %.1f s", what, tries,
                        type(exc).__name__, delay)
        time.sleep(delay)
        delay, tries = min(delay * 2, max_delay_s), tries + 1


def write_with_retry(fn: Callable[[Session], T], *, budget_s: float, what: str) -> T:
    """One unit of work (`fn(session)` then commit), retried in a new session on transient errors."""
    def once() -> T:
        with session_scope() as s:
            return fn(s)
    return retry_transient(once, budget_s=budget_s, what=what)
