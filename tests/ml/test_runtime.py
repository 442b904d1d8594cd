"""Worker processes set torch's thread count from `TUNEHOUSE_TORCH_THREADS` (0: half the cores)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from ml.runtime import auto_threads, configure_threads


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_auto_threads_leaves_half_the_cores() -> None:
    assert [auto_threads(n) for n in (1, 2, 3, 16)] == [1, 1, 1, 8]


@pytest.mark.usefixtures("restore_threads")
def test_configure_threads_sets_torch() -> None:
    assert configure_threads(1) == 1 == torch.get_num_threads()
    assert configure_threads(0) == auto_threads()
