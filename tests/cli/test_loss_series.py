"""`tunehouse jobs plot` draws the same one-value-per-step curve as the result CSV, across attempts."""

from __future__ import annotations

from typing import Any

from app.cli_user import loss_series


def _e(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": kind, "data": data}


def test_re_trained_steps_replace_the_abandoned_ones() -> None:
    oldest_first = [
        _e("message", attempt=1, resumed_from_step=None),
        _e("metrics", step=1, train_loss=3.0, attempt=1), _e("metrics", step=2, train_loss=2.0, attempt=1),
        _e("metrics", step=2, valid_loss=2.5, attempt=1), _e("metrics", step=3, train_loss=9.0, attempt=1),
        _e("message", attempt=2, resumed_from_step=2),
        _e("metrics", step=3, train_loss=1.0, attempt=2), _e("metrics", step=4, train_loss=0.5, attempt=2),
    ]
    train, valid = loss_series(oldest_first[::-1])  # listed newest first
    assert train == [(1, 3.0), (2, 2.0), (3, 1.0), (4, 0.5)]
    assert valid == [(2, 2.5)]
