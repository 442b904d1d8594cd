"""Fast path for JSONL validation: a block of lines decoded by msgspec into typed structs, then the
few checks a type cannot express. It is a conservative filter: it accepts only lines that the
detailed validator (`ml.data.formats.Validator`) accepts, with identical stats, and raises `Reject`
for anything else, so the caller re-checks those lines in detail (which words the errors).

Why each shortcut is safe:
- structs forbid unknown fields and type every value, so nesting is bounded and the keys decide
  the format exactly as `detect_format` does;
- msgspec refuses lone surrogate escapes, invalid UTF-8, raw control characters, NaN/Infinity,
  trailing data on a line and integers past its range; a NUL can only arrive as the escape
  `\\u0000`, which the caller looks for in the raw bytes;
- "blank" is tested as `not s or s.isspace()`, which is `not s.strip()` without the copy.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter
from typing import Any, Literal

import msgspec

Role = Literal["system", "user", "assistant", "tool", "developer"]
INT_LABEL_LIMIT = 1 << 63  # int labels beyond this go to the detailed path (digit limits, str())


class Reject(Exception):
    """The block (or line) needs the detailed validator."""


class _Message(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    role: Role
    content: str
    weight: Literal[0, 1] = 1
    name: str | None = None


class _Chat(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    messages: list[_Message]


class _Input(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    messages: list[_Message]


class _Output(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    role: Literal["assistant"]
    content: str


class _Preference(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    input: _Input
    preferred_output: list[_Output]
    non_preferred_output: list[_Output]


class _PromptCompletion(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    prompt: str
    completion: str


class _Text(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    text: str


class _Classification(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    text: str
    label: str | int


class _Regression(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    text: str
    value: int | float  # ints stay ints so float() rounds them exactly as the detailed path does


@dataclass
class BlockStats:
    """What a block adds to the report (`Report.add` for each record, summed)."""

    rows: int = 0
    chars: int = 0
    labels: dict[str, int] = field(default_factory=dict)  # rows per label
    values: list[float] = field(default_factory=list)


_text_of, _content_of, _messages_of = attrgetter("text"), attrgetter("content"), attrgetter("messages")


def _no_blank(strings: list[str]) -> None:
    """Reject unless every string has a non-whitespace character (C loops: rows can be short)."""
    if not all(strings) or any(map(str.isspace, strings)):
        raise Reject


def _messages_chars(msg_lists: list[list[_Message]], need_learned: bool) -> int:
    """Characters of valid message lists; `need_learned`: each needs an assistant message with weight 1."""
    for msgs in msg_lists:
        learned = False
        for m in msgs:
            if m.role == "assistant":
                content = m.content
                if not content or content.isspace():
                    raise Reject
                learned = learned or m.weight == 1
        if not msgs or (need_learned and not learned):
            raise Reject
    return sum(map(len, map(_content_of, chain.from_iterable(msg_lists))))


def _chat(recs: list[Any], out: BlockStats) -> None:
    out.chars += _messages_chars(list(map(_messages_of, recs)), True)


def _one_output(outs: list[_Output]) -> str:
    if len(outs) != 1 or not outs[0].content or outs[0].content.isspace():
        raise Reject
    return outs[0].content


def _preference(recs: list[Any], out: BlockStats) -> None:
    for r in recs:
        chosen, rejected = _one_output(r.preferred_output), _one_output(r.non_preferred_output)
        if chosen.strip() == rejected.strip():
            raise Reject
        out.chars += len(chosen) + len(rejected)
    out.chars += _messages_chars([r.input.messages for r in recs], False)


def _prompt_completion(recs: list[Any], out: BlockStats) -> None:
    completions = list(map(attrgetter("completion"), recs))
    _no_blank(completions)
    out.chars += sum(map(len, map(attrgetter("prompt"), recs))) + sum(map(len, completions))


def _texts(recs: list[Any], out: BlockStats) -> None:
    texts = list(map(_text_of, recs))
    _no_blank(texts)
    out.chars += sum(map(len, texts))


def _label_counts(labels: list[str | int]) -> dict[str, int]:
    """Rows per str(label), as `normalize` names labels; Reject on a blank or out-of-range label.
    Counted first, so each distinct label is checked once (in order of first appearance)."""
    out: dict[str, int] = {}
    for label, count in Counter(labels).items():
        if type(label) is str:
            if not label or label.isspace():
                raise Reject
            key = label
        elif type(label) is int and -INT_LABEL_LIMIT < label < INT_LABEL_LIMIT:
            key = str(label)
        else:
            raise Reject
        out[key] = out.get(key, 0) + count
    return out


def _classification(recs: list[Any], out: BlockStats) -> None:
    _texts(recs, out)
    out.labels = _label_counts(list(map(attrgetter("label"), recs)))


def _regression(recs: list[Any], out: BlockStats) -> None:
    _texts(recs, out)
    values = list(map(float, map(attrgetter("value"), recs)))  # OverflowError on a huge int: rejected
    if not all(map(math.isfinite, values)):
        raise Reject
    out.values.extend(values)


_Checker = Callable[[list[Any], BlockStats], None]
_FORMATS: dict[str, tuple[type[msgspec.Struct], _Checker]] = {
    "chat": (_Chat, _chat),
    "preference": (_Preference, _preference),
    "prompt_completion": (_PromptCompletion, _prompt_completion),
    "text": (_Text, _texts),
    "classification": (_Classification, _classification),
    "regression": (_Regression, _regression),
}


class FastChecker:
    """Checks lines of one format (the file's, from its first record)."""

    def __init__(self, fmt: str) -> None:
        struct, self._check = _FORMATS[fmt]
        self._decode = msgspec.json.Decoder(struct).decode

    def lines(self, lines: list[bytes]) -> BlockStats:
        """Stats for `lines` (no newlines; none blank, none over the length limit, no NUL escape),
        or Reject if any line is not a well-formed record of this format."""
        try:
            recs = list(map(self._decode, lines))  # one object per line: trailing data is an error
            out = BlockStats(rows=len(recs))
            self._check(recs, out)
        except (msgspec.DecodeError, ValueError, OverflowError):  # OverflowError: float() of a huge int
            raise Reject from None
        return out
