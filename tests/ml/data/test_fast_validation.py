"""The fast JSONL scan (msgspec, a block at a time) and the detailed one (`fast=False`, every line
through `Validator.json_line`) agree on everything a report holds, whatever the mix of lines."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import pytest

from ml.data import fastjson, formats

DEEP = "[" * 3000 + "]" * 3000
ASSISTANT = {"role": "assistant", "content": "yo"}


def _line(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _chat(*messages: dict[str, Any], **extra: Any) -> bytes:
    return _line({"messages": [{"role": "user", "content": "hi"}, *messages], **extra})


def _pref(chosen: str = "a", rejected: str = "b", **extra: Any) -> bytes:
    return _line({"input": {"messages": [{"role": "user", "content": "q"}]},
                  "preferred_output": [{"role": "assistant", "content": chosen}],
                  "non_preferred_output": [{"role": "assistant", "content": rejected}], **extra})


# (format, good lines, lines the fast path must refuse: bad, hostile, or valid but unusual)
POOLS: dict[str, tuple[list[bytes], list[bytes]]] = {
    "chat": ([_chat(ASSISTANT), _chat({"role": "assistant", "content": "é 🙂", "weight": 1, "name": "x"}),
              _chat({**ASSISTANT, "weight": 0}, ASSISTANT)], [
        _chat({**ASSISTANT, "weight": 0}), _chat({"role": "assistant", "content": " "}), _line({"messages": []}),
        _chat({"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}, ASSISTANT),
        _chat({"role": "user", "content": [{"type": "text", "text": "x"}]}, ASSISTANT),
        _chat({**ASSISTANT, "weight": 1.0}), _chat({**ASSISTANT, "weight": True}), _chat({**ASSISTANT, "weight": 2}),
        _chat({"role": "bot", "content": "x"}), _chat(ASSISTANT, id=7),
        b'{"messages": [{"role": "assistant", "content": "\\ud800"}]}',
        b'{"messages": [{"role": "assistant", "content": "a\\u0000"}]}',
        b'{"messages": [{"role": "assistant", "content": "a", "x": ' + DEEP.encode() + b"}]}",
        b'{"messages": [{"role": "assistant", "content": "a"}], "messages": []}',
    ]),
    "classification": ([_line({"text": "a", "label": "x"}), _line({"text": "b", "label": 3}),
                        _line({"text": "c", "label": "3"})], [
        _line({"text": "a", "label": True}), _line({"text": "a", "label": 1.5}), _line({"text": " ", "label": "x"}),
        _line({"text": "a", "label": "\t"}), _line({"text": "a"}), _line({"text": "a", "label": "x", "id": 1}),
        b'{"text": "a", "label": ' + b"1" * 4301 + b"}", b'{"text": "a", "label": ' + b"9" * 30 + b"}",
        b'{"text": "a", "label": "x"} {"text": "b", "label": "y"}', b'{"text": "a",', b'"label": "x"}',
        b"[1, 2]", b"3", b"", b"   ", b"\x1c", b'{"text": "\xff", "label": "x"}',
        b'{"text": "\xed\xa0\x80", "label": "x"}',
        b'{"text": "a\tb", "label": "x"}', b'{"text": "\\u0000", "label": "x"}', b'{"text": "a", "label": NaN}',
        b'{"text": "a", "label": "x"}\x00', b'{"text": "a", "label": "' + b"y" * 3000 + b'"}',
    ]),
    "regression": ([_line({"text": "a", "value": 1}), _line({"text": "a", "value": -2.5e-7})], [
        _line({"text": "a", "value": "2.5"}), _line({"text": "a", "value": "x"}), b'{"text": "a", "value": Infinity}',
        b'{"text": "a", "value": 1e400}', b'{"text": "a", "value": ' + b"1" * 400 + b"}",
        b'{"text": "a", "value": ' + b"1" * 5000 + b"}", _line({"text": "a", "value": None}),
    ]),
    "prompt_completion": ([_line({"prompt": "", "completion": "b"}), _line({"prompt": "a", "completion": "b"})], [
        _line({"prompt": "a", "completion": " "}), _line({"completion": "b"}), _line({"prompt": 1, "completion": "b"}),
    ]),
    "preference": ([_pref(), _pref("x", "y")], [
        _pref("a ", " a"), _pref(tools=[]), _line({"input": {"messages": []}, "preferred_output": [],
                                                 "non_preferred_output": []}),
    ]),
}
HOSTILE = [line for _, bad in POOLS.values() for line in bad]


def _report(path: Path, fast: bool, max_line_bytes: int, max_errors: int) -> dict[str, Any]:
    report = formats.validate_file(path, "jsonl", max_line_bytes=max_line_bytes, max_errors=max_errors, fast=fast)
    out = dataclasses.asdict(report)
    out["labels"] = list(report.labels.items())  # order too
    return out


@pytest.mark.parametrize("seed", range(120))
def test_fast_and_detailed_scans_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    rnd = random.Random(seed)
    fmt = list(POOLS)[seed % len(POOLS)]
    good, bad = POOLS[fmt]
    p_bad = [0.0, 0.01, 0.1, 0.5][seed % 4]
    lines = [rnd.choice(HOSTILE + bad) if rnd.random() < p_bad else rnd.choice(good)
             for _ in range(rnd.randint(1, 300))]
    if seed % 5 == 0:
        lines[0] = formats.BOM + lines[0]
    sep = b"\r\n" if seed % 7 == 0 else b"\n"
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(sep.join(lines) + (sep if seed % 3 else b""))
    monkeypatch.setattr(formats, "BLOCK_BYTES", rnd.choice([64, 700, 4096, 1 << 20]))  # blocks split lines
    limits = {"max_line_bytes": rnd.choice([200, 1 << 20]), "max_errors": rnd.choice([1, 5, 1000])}
    assert _report(path, True, **limits) == _report(path, False, **limits)


@pytest.mark.parametrize("text_chars", [1, 150_000])  # 150 kB lines: longer than a block
def test_fast_path_takes_the_well_formed_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                text_chars: int) -> None:
    """A valid file goes through the fast path (not line by line); its stats are the detailed ones."""
    calls: list[int] = []
    lines_of = fastjson.FastChecker.lines

    def counting(self: fastjson.FastChecker, lines: list[bytes]) -> fastjson.BlockStats:
        calls.append(len(lines))
        return lines_of(self, lines)

    monkeypatch.setattr(fastjson.FastChecker, "lines", counting)
    monkeypatch.setattr(formats, "BLOCK_BYTES", 4096)
    rows = 3000 if text_chars == 1 else 20
    good = [_line({"text": "a" * text_chars, "label": "x"}), _line({"text": "é" * text_chars, "label": 3})]
    path = tmp_path / "good.jsonl"
    path.write_bytes(b"\n".join(good[i % 2] for i in range(rows)) + b"\n")
    fast = _report(path, True, 1 << 20, 20)
    assert sum(calls) == rows - 1 and max(calls) > (20 if text_chars == 1 else 0)  # line 1 is read in detail
    assert fast == _report(path, False, 1 << 20, 20)
    assert fast["rows"] == rows and fast["labels"] == [("x", rows // 2), ("3", rows // 2)]
