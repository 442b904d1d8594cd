"""Text a dataset cannot hold: a NUL character (Postgres refuses it in the file's stats, tokenizers
mangle it) or an unpaired surrogate (JSON's "\\ud800" escape parses to one; it is not Unicode and
cannot be encoded as UTF-8). The API's request check (`app.kit.input_guard`) uses it too: keep it stdlib-only."""

from __future__ import annotations

import re
from typing import Any

_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")


def text_problem(value: str) -> str | None:
    m = _BAD_TEXT.search(value)
    if m is None:
        return None
    return "contains a NUL character" if m.group() == "\x00" else "contains an unpaired surrogate (not valid Unicode)"


def find_bad_text(obj: Any) -> tuple[str | None, str] | None:
    """(field, problem) for the first bad string or key of a parsed JSON record, in document order;
    iterative, so any nesting the parser accepted is fine."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if problem := text_problem(value):
                return path or None, problem
        elif isinstance(value, dict):
            for key in value:
                if isinstance(key, str) and (problem := text_problem(key)):
                    return path or None, f"has a key that {problem}"
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value))))
    return None
