"""Dataset formats: detection, per-record validation (errors name line and field) and the
normalized record iterator the trainer reads.

JSONL record shapes (one JSON object per line):
  chat               {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}
  prompt_completion  {"prompt": str, "completion": str}
  text               {"text": str}
  classification     {"text": str, "label": str|int}
  regression         {"text": str, "value": number}
CSV files carry the same fields as a header row (text,label / text,value / prompt,completion / text).

`validate_file` checks a whole upload (encoding, line length, JSON, schema, one format per file);
`iter_records` reads a validated file back, splitting lines exactly the same way.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

# csv's default field limit (128 KiB) is below our line limit; record size is bounded by
# validation (max_line_bytes) instead, so lift it for the validator and the trainer alike.
csv.field_size_limit(2**31 - 1)


class Format(StrEnum):
    chat = "chat"
    prompt_completion = "prompt_completion"
    text = "text"
    classification = "classification"
    regression = "regression"


# Which dataset formats each task trains on.
TASK_FORMATS: dict[str, set[Format]] = {
    "causal_lm": {Format.chat, Format.prompt_completion, Format.text},
    "classification": {Format.classification},
    "regression": {Format.regression},
    "masked_lm": {Format.text, Format.classification, Format.regression},
}

CHAT_ROLES = {"system", "user", "assistant", "tool", "developer"}


class RecordError(ValueError):
    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


@dataclass
class LineError:
    line: int
    message: str
    field: str | None = None

    def render(self) -> str:
        where = f"line {self.line}" + (f", field '{self.field}'" if self.field else "")
        return f"{where}: {self.message}"


def detect_format(obj: dict[str, Any]) -> Format:
    keys = set(obj)
    if "messages" in keys:
        return Format.chat
    if "prompt" in keys or "completion" in keys:
        return Format.prompt_completion
    if "text" in keys and "label" in keys:
        return Format.classification
    if "text" in keys and "value" in keys:
        return Format.regression
    if "text" in keys:
        return Format.text
    raise RecordError(
        f"unrecognized record with keys {sorted(keys)}; expected one of: messages | prompt+completion | "
        "text | text+label | text+value"
    )


def _nonempty_str(obj: dict[str, Any], key: str, where: str | None = None) -> str:
    where = where or key
    if key not in obj:
        raise RecordError(f"missing required field '{where}'", where)
    v = obj[key]
    if not isinstance(v, str):
        raise RecordError(f"'{where}' must be a string, got {type(v).__name__}", where)
    if not v.strip():
        raise RecordError(f"'{where}' must not be empty", where)
    return v


def _normalize_chat(obj: dict[str, Any]) -> dict[str, Any]:
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RecordError("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RecordError(f"'{where}' must be an object", where)
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise RecordError(f"'{where}.role' must be one of {sorted(CHAT_ROLES)}, got {role!r}",
                              f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise RecordError(f"'{where}.content' must be a string", f"{where}.content")
        if role == "assistant" and not content.strip() and not m.get("tool_calls"):
            raise RecordError(f"'{where}.content' must not be empty for an assistant message",
                              f"{where}.content")
        weight = m.get("weight", 1)
        if weight not in (0, 1):
            raise RecordError(f"'{where}.weight' must be 0 or 1", f"{where}.weight")
        out.append({"role": role, "content": content, "weight": int(weight)})
    if not any(m["role"] == "assistant" and m["weight"] for m in out):
        raise RecordError("a chat example needs at least one assistant message to learn from", "messages")
    return {"messages": out}


def normalize(obj: Any, fmt: Format | None = None) -> tuple[Format, dict[str, Any]]:
    """Validate one record; return its format and normalized form. Raises RecordError."""
    if not isinstance(obj, dict):
        raise RecordError(f"each line must be a JSON object, got {type(obj).__name__}")
    found = detect_format(obj)
    if fmt is not None and found != fmt:
        raise RecordError(f"expected a {fmt.value} record like the first line, got {found.value} "
                          f"(keys {sorted(obj)})")
    if found is Format.chat:
        return found, _normalize_chat(obj)
    if found is Format.prompt_completion:
        prompt = obj.get("prompt")
        if not isinstance(prompt, str):
            raise RecordError("'prompt' must be a string", "prompt")
        return found, {"prompt": prompt, "completion": _nonempty_str(obj, "completion")}
    text = _nonempty_str(obj, "text")
    if found is Format.classification:
        label = obj["label"]
        if isinstance(label, bool) or not isinstance(label, str | int):
            raise RecordError("'label' must be a string or an integer", "label")
        if isinstance(label, str) and not label.strip():
            raise RecordError("'label' must not be empty", "label")
        return found, {"text": text, "label": str(label)}
    if found is Format.regression:
        value = obj["value"]
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise RecordError(f"'value' must be a number, got {obj['value']!r}", "value") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RecordError("'value' must be a finite number", "value")
        return found, {"text": text, "value": float(value)}
    return found, {"text": text}


@dataclass
class Report:
    """What validation found. `stats` lands on the file object."""

    kind: str  # jsonl | csv
    format: Format | None = None
    rows: int = 0
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    value_min: float | None = None
    value_max: float | None = None
    chars: int = 0
    columns: list[str] | None = None  # CSV header
    truncated: bool = False  # stopped scanning at max_errors

    def add(self, fmt: Format, rec: dict[str, Any]) -> None:
        self.rows += 1
        if fmt is Format.classification:
            self.labels[rec["label"]] = self.labels.get(rec["label"], 0) + 1
        elif fmt is Format.regression:
            v = rec["value"]
            self.value_min = v if self.value_min is None else min(self.value_min, v)
            self.value_max = v if self.value_max is None else max(self.value_max, v)
        self.chars += _record_chars(fmt, rec)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "rows": self.rows, "chars": self.chars}
        if self.labels:
            out["labels"] = dict(sorted(self.labels.items()))
        if self.value_min is not None:
            out["value_min"], out["value_max"] = self.value_min, self.value_max
        if self.columns is not None:
            out["columns"] = self.columns
        return out


def _record_chars(fmt: Format, rec: dict[str, Any]) -> int:
    if fmt is Format.chat:
        return sum(len(m["content"]) for m in rec["messages"])
    if fmt is Format.prompt_completion:
        return len(rec["prompt"]) + len(rec["completion"])
    return len(rec["text"])


class Validator:
    """Feed lines (or CSV rows) one at a time; memory stays flat whatever the file size."""

    def __init__(self, kind: str, max_errors: int = 20) -> None:
        self.report = Report(kind=kind)
        self.max_errors = max_errors

    @property
    def full(self) -> bool:
        return len(self.report.errors) >= self.max_errors

    def error(self, line: int, message: str, field: str | None = None) -> None:
        self.report.error_count += 1
        if len(self.report.errors) < self.max_errors:
            self.report.errors.append(LineError(line, message, field))

    def record(self, line: int, obj: Any) -> None:
        try:
            fmt, rec = normalize(obj, self.report.format)
        except RecordError as e:
            self.error(line, e.message, e.field)
            return
        if self.report.format is None:
            self.report.format = fmt
        self.report.add(fmt, rec)

    def json_line(self, line: int, raw: str) -> None:
        if not raw.strip():
            return  # blank lines are allowed (trailing newline, separators)
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            self.error(line, f"invalid JSON: {e.msg} (column {e.colno})")
            return
        self.record(line, obj)


CSV_COLUMNS = {"text", "label", "value", "prompt", "completion"}
BOM = b"\xef\xbb\xbf"


def csv_record(header: list[str], row: list[str]) -> dict[str, Any]:
    if len(row) != len(header):
        raise RecordError(f"expected {len(header)} columns ({', '.join(header)}), got {len(row)}")
    return {k: v for k, v in zip(header, row, strict=True) if k in CSV_COLUMNS}


def check_csv_header(header: list[str]) -> list[str]:
    cols = [h.strip().lower() for h in header]
    known = [c for c in cols if c in CSV_COLUMNS]
    if not known:
        raise RecordError(f"CSV header must name columns among {sorted(CSV_COLUMNS)}, got {header}")
    if len(set(known)) != len(known):
        raise RecordError(f"CSV header repeats a column: {header}")
    detect_format(dict.fromkeys(known, ""))  # e.g. a lone 'label' column is no format
    return cols


def kind_from_name(filename: str) -> str | None:
    name = filename.lower()
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    return None


def sniff_kind(filename: str, head: bytes) -> str:
    """jsonl | csv: by extension, else by the first non-blank byte."""
    by_name = kind_from_name(filename)
    if by_name is not None:
        return by_name
    return "jsonl" if head.removeprefix(BOM).lstrip()[:1] in (b"{", b"[") else "csv"


def _text_lines(path: Path) -> Iterator[str]:
    """Lines split on b"\\n" only, exactly as the validator splits them."""
    with open(path, "rb") as raw:
        for i, line in enumerate(raw):
            yield (line.removeprefix(BOM) if i == 0 else line).decode("utf-8")


def iter_records(path: Path, kind: str = "jsonl") -> Iterator[dict[str, Any]]:
    """Normalized records of a validated file, streamed. Skips blank lines."""
    if kind == "csv":
        reader = csv.reader(_text_lines(path))
        header: list[str] | None = None
        for row in reader:
            if not any(c.strip() for c in row):
                continue
            if header is None:
                header = check_csv_header(row)
            else:
                yield normalize(csv_record(header, row))[1]
        return
    for raw in _text_lines(path):
        if raw.strip():
            yield normalize(json.loads(raw))[1]


# --- whole-file validation: bytes -> lines -> records, streamed, memory flat -----------------

class _Fatal(Exception):
    """Stops the scan: the rest of the file cannot be read meaningfully."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def _skip_rest_of_line(fh: IO[bytes]) -> None:
    while chunk := fh.readline(1 << 20):
        if chunk.endswith(b"\n"):
            return


def _physical_lines(fh: IO[bytes], v: Validator, max_line_bytes: int) -> Iterator[tuple[int, str]]:
    """(line number, decoded text incl. newline); bad lines are reported and skipped."""
    n = 0
    while not v.full and (raw := fh.readline(max_line_bytes + 1)):
        n += 1
        if n == 1:
            raw = raw.removeprefix(BOM)
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            _skip_rest_of_line(fh)
            v.error(n, f"line is longer than the {max_line_bytes}-byte limit")
            continue
        if b"\x00" in raw:
            raise _Fatal(n, f"binary content (NUL byte at column {raw.index(0) + 1}); "
                            "upload UTF-8 text: JSONL or CSV")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            v.error(n, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
            continue
        yield n, text


def _scan_jsonl(lines: Iterator[tuple[int, str]], v: Validator) -> None:
    last = 0
    for n, text in lines:
        last = n
        if n == 1 and text.lstrip().startswith("["):
            raise _Fatal(1, "the file looks like a JSON array; upload JSON Lines: one JSON object per line")
        v.json_line(n, text)
        if v.full:
            return
    if v.report.rows == 0 and v.report.error_count == 0:
        v.error(max(last, 1), "no records: the file contains only blank lines")


class _CsvFeed:
    """Feeds physical lines to csv.reader, tracking where the current record began and
    bounding its size (an unbalanced quote would otherwise swallow the rest of the file)."""

    def __init__(self, lines: Iterator[tuple[int, str]], limit: int) -> None:
        self.lines, self.limit = lines, limit
        self.start = self.last = self.size = 0

    def __iter__(self) -> Iterator[str]:
        for n, text in self.lines:
            if self.size == 0:
                self.start = n
            self.size += len(text)
            self.last = n
            if self.size > self.limit:
                raise _Fatal(self.start, f"CSV record is longer than the {self.limit}-byte limit "
                                         "(unbalanced quote?)")
            yield text

    def record_start(self) -> int:
        """Call after each row: the line the row began on; starts a new record."""
        self.size = 0
        return self.start


def _csv_header(n: int, row: list[str], sniffed: bool) -> list[str]:
    try:
        return check_csv_header(row)
    except RecordError as e:
        hint = "neither JSON Lines (it does not start with '{') nor CSV: " if sniffed else ""
        raise _Fatal(n, f"{hint}{e.message}") from None


def _scan_csv(lines: Iterator[tuple[int, str]], v: Validator, limit: int, sniffed: bool) -> None:
    feed = _CsvFeed(lines, limit)
    header: list[str] | None = None
    header_line = 0
    try:
        for row in csv.reader(iter(feed)):
            n = feed.record_start()
            if not any(c.strip() for c in row):
                continue
            if header is None:
                header = v.report.columns = _csv_header(n, row, sniffed)
                header_line = n
                continue
            try:
                v.record(n, csv_record(header, row))
            except RecordError as e:
                v.error(n, e.message, e.field)
            if v.full:
                return
    except csv.Error as e:
        raise _Fatal(feed.last, f"invalid CSV: {e}") from None
    if v.report.rows == 0 and v.report.error_count == 0:
        where = "after the CSV header" if header is not None else "and no CSV header"
        v.error(header_line + 1, f"no data rows {where}")


def validate_file(path: Path, kind: str, *, max_line_bytes: int, max_errors: int = 20,
                  sniffed: bool = False) -> Report:
    """Check a whole JSONL/CSV file line by line. Errors (with line numbers) land in the report;
    scanning stops after `max_errors`. `sniffed`: the kind was guessed from the content."""
    v = Validator(kind, max_errors)
    with open(path, "rb") as fh:
        head = fh.read(2)
        fh.seek(0)
        try:
            if not head:
                raise _Fatal(1, "the file is empty")
            if head in (b"\xff\xfe", b"\xfe\xff"):
                raise _Fatal(1, "the file is UTF-16 encoded; save it as UTF-8")
            lines = _physical_lines(fh, v, max_line_bytes)
            if kind == "csv":
                _scan_csv(lines, v, max_line_bytes, sniffed)
            else:
                _scan_jsonl(lines, v)
        except _Fatal as e:
            v.error(e.line, e.message)
    v.report.truncated = v.full
    return v.report
