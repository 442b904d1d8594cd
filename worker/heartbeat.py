"""Worker heartbeats while a solo-pool worker runs a task.

Celery's `Heart` sends `worker-heartbeat` events from the consumer's event loop, which a solo pool
blocks for the whole task: a training worker would look offline in Flower (its 2 s beats stop, and
Flower expires a worker after two missed intervals). While a task runs, a thread sends the same
events, with the same fields, for the worker's hostname over a connection of its own (kombu
connections are not shared across threads)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from celery import Celery
from celery.utils.sysinfo import load_average
from celery.worker.state import SOFTWARE_INFO, active_requests, all_total_count

log = logging.getLogger(__name__)

INTERVAL_S = 2.0  # Celery's Heart default (`freq` in each event tells Flower what to expect)


@contextmanager
def heartbeats(app: Celery, hostname: str | None, interval: float = INTERVAL_S) -> Iterator[None]:
    """Beats every `interval` seconds for as long as the block runs (no-op without task events)."""
    if not hostname or not app.conf.worker_send_task_events:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=_beat, args=(app, hostname, interval, stop), name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _beat(app: Celery, hostname: str, interval: float, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            with app.connection_for_write() as conn, app.events.Dispatcher(conn, hostname=hostname,
                                                                             enabled=True) as dispatcher:
                while True:  # the first beat at once: the loop's last one may be nearly expired
                    dispatcher.send("worker-heartbeat", freq=interval, active=len(active_requests),
                                    processed=all_total_count[0], loadavg=load_average(), **SOFTWARE_INFO)
                    if stop.wait(interval):
                        return
        except Exception:  # a broker blip costs Flower's view for a beat, never the task
            log.warning("worker heartbeat not sent; retrying", exc_info=True)
            stop.wait(interval)
