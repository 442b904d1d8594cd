"""Celery config: task events on for Redis (Flower shows queued and running tasks), off for the
embedded filesystem broker (no fanout exchange to publish them on)."""

from __future__ import annotations

from pathlib import Path

from app.kit.broker import make_celery
from app.settings import Settings


def test_task_events_on_with_redis() -> None:
    conf = make_celery(Settings(broker_url="redis://127.0.0.1:6379/0")).conf
    assert conf.worker_send_task_events is True and conf.task_send_sent_event is True


def test_task_events_off_when_embedded(tmp_path: Path) -> None:
    conf = make_celery(Settings(broker_url="", data_dir=tmp_path)).conf
    assert conf.worker_send_task_events is False and conf.task_send_sent_event is False
