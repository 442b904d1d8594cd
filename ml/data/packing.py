"""Padding-free packing plans for causal-LM SFT: which examples share a row of at most `max_len` tokens.

Torch-free: the trainer packs with it and the API's estimate counts packed rows (hence steps) with it.
The plan is best-fit decreasing over the example lengths, a pure function of (lengths, max_len): it
does not depend on the seed or the epoch, so every epoch has the same number of rows (the LR schedule
is laid out once) and a resumed run sees the same rows. Epochs shuffle the rows, not their contents.
"""

from __future__ import annotations

import bisect


def pack_rows(lengths: list[int], max_len: int) -> list[list[int]]:
    """Example indices per row, longest first within a row; every row holds at most `max_len` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the tightest row that fits is a bisect away
    for i in order:
        need = min(lengths[i], max_len)
        k = bisect.bisect_left(free, (need, -1))
        if k == len(free):
            rows.append([i])
            room, row = max_len - need, len(rows) - 1
        else:
            room, row = free.pop(k)
            rows[row].append(i)
            room -= need
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


def packed_row_count(lengths: list[int], max_len: int) -> int:
    return len(pack_rows(lengths, max_len))


def row_lengths(rows: list[list[int]], lengths: list[int]) -> list[int]:
    return [sum(lengths[i] for i in row) for row in rows]
