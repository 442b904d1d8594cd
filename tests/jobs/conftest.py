from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """In-process training tests: one torch thread (the box is small and shared), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def empty_training_queue() -> Iterator[None]:
    """The training queue holds no claim tokens (other tests send theirs), before and after."""
    from app.jobs.queue import purge_training_queue

    purge_training_queue()
    yield
    purge_training_queue()
