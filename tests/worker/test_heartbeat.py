"""A solo-pool worker busy with a task still beats: `worker-heartbeat` events reach the broker (Redis)
from the heartbeat thread, with the fields Flower's state needs to keep the worker online."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
from celery.concurrency.solo import TaskPool as SoloPool
from celery.events.state import State

from app.kit.broker import get_celery
from worker import tasks
from worker.heartbeat import heartbeats


def test_heartbeats_reach_the_broker_while_a_task_runs() -> None:
    app = get_celery()
    if not app.conf.worker_send_task_events:
        pytest.skip("task events need the Redis broker (the embedded one has no fanout)")
    hostname = f"celery@heartbeat-test-{uuid.uuid4().hex[:8]}"
    beats: list[dict[str, Any]] = []

    def on_beat(event: dict[str, Any]) -> None:
        if event.get("hostname") == hostname:
            beats.append(event)

    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"worker-heartbeat": on_beat})
        with heartbeats(app, hostname, interval=0.2):  # the first beats may come before the subscription
            deadline = time.monotonic() + 30
            for _ in receiver.itercapture(limit=None, timeout=30, wakeup=False):
                if len(beats) >= 2 or time.monotonic() > deadline:
                    break
    assert len(beats) >= 2
    state = State()
    for event in beats:
        state.event(event)
    worker = state.workers[hostname]
    assert worker.alive and worker.freq == 0.2 and worker.sw_ident  # what Flower's worker list reads
    assert not [t for t in threading.enumerate() if t.name == "heartbeat"]  # stopped with the block


def test_only_a_solo_pool_worker_sends_its_own_beats() -> None:
    tasks.SOLO_POOL.clear()
    try:
        tasks._note_pool(sender=object())  # a prefork / threads worker: Celery's Heart keeps beating
        assert not tasks.SOLO_POOL.is_set()
        tasks._note_pool(sender=type("Consumer", (), {"pool": object.__new__(SoloPool)})())
        assert tasks.SOLO_POOL.is_set()
    finally:
        tasks.SOLO_POOL.clear()
