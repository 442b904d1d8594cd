"""A failed rank waits (bounded) for rank 0's last channel line before it exits: torchrun stops the whole
group as soon as one rank exits, which would cut rank 0 off before it reports the error it found too."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from ml.training.launch import _await_last_line


def test_a_failed_rank_returns_once_rank_zero_reported(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps({"kind": "metrics", "step": 1, "values": {}}) + "\n")
    waiter = threading.Thread(target=_await_last_line, args=(events, 60.0))
    waiter.start()
    with events.open("a") as fh:  # the error line comes in two writes: half a line is not a report
        fh.write(json.dumps({"kind": "message", "text": "x"}) + '\n{"kind": "err')
        fh.flush()
        waiter.join(timeout=0.5)
        assert waiter.is_alive()
        fh.write('or", "message": "no labels", "code": "invalid_training_data"}\n')
    waiter.join(timeout=30)
    assert not waiter.is_alive()


def test_without_a_report_it_gives_up_at_the_deadline(tmp_path: Path) -> None:
    begin = time.monotonic()
    _await_last_line(tmp_path / "never-written.jsonl", deadline_s=0.3)
    assert 0.3 <= time.monotonic() - begin < 30
