"""Inference usage, metered without a database write per request: the API process adds served
predictions and tokens up in memory and writes them (one `add_usage` upsert per project) every
`FLUSH_INTERVAL_S` from a background task, when a usage report is read in this process
(`flush_pending`), and at shutdown. A process killed outright loses at most its last interval's counts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

import anyio.to_thread
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.kit.db import get_sessionmaker, session_scope

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0


Write = Callable[[Session, str, int, int], None]  # (session, project id, predictions, tokens served)


class UsageMeter:
    def __init__(self, write: Write) -> None:
        self._write = write
        self._pending: dict[str, list[int]] = {}  # project id -> [predictions, tokens served]
        self._lock = threading.Lock()
        self._factory: sessionmaker[Session] | None = None
        self._flusher: asyncio.Task[None] | None = None

    def add(self, project_id: str, predictions: int, tokens: int,
            factory: sessionmaker[Session] | None = None) -> None:
        """Count a response (in memory only); starts this event loop's flusher if it is not running."""
        with self._lock:
            counts = self._pending.setdefault(project_id, [0, 0])
            counts[0] += predictions
            counts[1] += tokens
            self._factory = factory or self._factory
        with contextlib.suppress(RuntimeError):  # no running loop: the next read or flush writes it
            self._ensure_flusher(asyncio.get_running_loop())

    def _ensure_flusher(self, loop: asyncio.AbstractEventLoop) -> None:
        task = self._flusher
        if task is None or task.done() or task.get_loop() is not loop:
            self._flusher = loop.create_task(self._flush_periodically(), name="usage-meter")

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            if self._pending:
                try:
                    await anyio.to_thread.run_sync(self.flush)
                except Exception:
                    log.warning("could not write metered usage; retrying", exc_info=True)

    def _take(self) -> dict[str, list[int]]:
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def _restore(self, pending: dict[str, list[int]]) -> None:
        with self._lock:
            for project_id, (p, t) in pending.items():
                counts = self._pending.setdefault(project_id, [0, 0])
                counts[0] += p
                counts[1] += t

    def flush(self) -> None:
        """Write what is pending in a session of its own (blocking: off the event loop)."""
        if self._pending:
            with session_scope(self._factory or get_sessionmaker()) as session:
                self.flush_into(session)

    def flush_into(self, session: Session) -> None:
        """Write what is pending in the caller's transaction; counts come back if it fails here."""
        pending = self._take()
        try:
            for project_id, (predictions, tokens) in pending.items():
                self._write_one(session, project_id, predictions, tokens)
        except Exception:
            self._restore(pending)
            raise

    def _write_one(self, session: Session, project_id: str, predictions: int, tokens: int) -> None:
        try:
            with session.begin_nested():  # a project deleted meanwhile loses its counts, not the others'
                self._write(session, project_id, predictions, tokens)
        except IntegrityError:
            log.info("dropped metered usage of a project that no longer exists", extra={"project_id": project_id})
