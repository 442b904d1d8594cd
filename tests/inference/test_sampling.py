"""Decoding details without a model: stop strings (also split across tokens), held-back text,
finish reasons, top-p and seeded sampling."""

from __future__ import annotations

from typing import Any

import torch

from ml.inference.loading import Tok
from ml.inference.sampling import GenEvent, RowDecoder, RowParams, make_generator, sample_token

PIECES = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "\n", 6: "EN", 7: "D", 9: "<eos>"}


class FakeTokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(PIECES[i] for i in ids if not (skip_special_tokens and i == 9))


def _decode(tokens: list[int], **params: Any) -> tuple[list[GenEvent], RowDecoder]:
    events: list[GenEvent] = []
    row = RowParams(max_new_tokens=params.pop("max_new_tokens", 10), **params)
    dec = RowDecoder(row, Tok(FakeTokenizer()), {9}, events.append)
    for t in tokens:
        dec.push(t)
    return events, dec


def test_stop_string_split_across_tokens_is_never_emitted() -> None:
    events, dec = _decode([1, 2, 3, 6, 7, 4], stop=("END",))
    assert "".join(e.text for e in events) == "Hello wor"
    assert events[-1].finish_reason == "stop" and dec.done
    assert all("E" not in e.text for e in events)


def test_partial_stop_prefix_is_released_when_it_does_not_complete() -> None:
    events, _ = _decode([1, 6, 2, 9], stop=("END",))
    assert "".join(e.text for e in events) == "HelENlo"
    assert events[-1].finish_reason == "stop" and events[-1].completion_tokens == 3


def test_length_finish_and_eos() -> None:
    events, _ = _decode([1, 2, 3, 4], max_new_tokens=2)
    assert "".join(e.text for e in events) == "Hello" and events[-1].finish_reason == "length"
    events, _ = _decode([1, 9, 2])
    assert "".join(e.text for e in events) == "Hel" and [e.finish_reason for e in events][-1] == "stop"


def test_sampling_is_seeded_and_respects_top_p() -> None:
    logits = torch.tensor([5.0, 4.9, -10.0, -10.0])
    params = RowParams(max_new_tokens=1, temperature=1.0, top_p=0.5)
    draws = {sample_token(logits, params, make_generator(s, torch.device("cpu"))) for s in range(50)}
    assert draws == {0}  # token 0 alone carries > 50% of the mass
    wide = RowParams(max_new_tokens=1, temperature=1.0, top_p=1.0)
    cpu = torch.device("cpu")
    seq1 = [sample_token(logits, wide, g) for g in [make_generator(3, cpu)] for _ in range(20)]
    seq2 = [sample_token(logits, wide, g) for g in [make_generator(3, cpu)] for _ in range(20)]
    assert seq1 == seq2 and set(seq1) <= {0, 1}
    greedy = RowParams(max_new_tokens=1, temperature=0.0)
    assert sample_token(logits, greedy, make_generator(0, logits.device)) == 0
