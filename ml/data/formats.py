"""Dataset formats: detection, per-record validation (errors name line and field) and the
normalized record iterator the trainer reads.

JSONL record shapes (one JSON object per line):
  chat               {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}
  prompt_completion  {"prompt": str, "completion": str}
  text               {"text": str}
  classification     {"text": str, "label": str|int}
  regression         {"text": str, "value": number}
  preference         {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": str}],
                      "non_preferred_output": [{"role": "assistant", "content": str}]}  (DPO, as OpenAI's)
CSV files carry the same fields as a header row (text,label / text,value / prompt,completion / text).

`validate_file` checks a whole upload (encoding, line length, JSON, schema, one format per file);
JSONL goes through a fast path (`ml.data.fastjson`, blocks of lines) that hands any line it does not
accept to the detailed validator here, which words every error. `iter_records` reads a validated file
back, splitting lines exactly the same way.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from ml.data.fastjson import BlockStats, FastChecker, Reject
from ml.data.text import find_bad_text

# csv's default field limit (128 KiB) is below our line limit; record size is bounded by
# validation (max_line_bytes) instead, so lift it for the validator and the trainer alike.
csv.field_size_limit(2**31 - 1)


class Format(StrEnum):
    chat = "chat"
    prompt_completion = "prompt_completion"
    text = "text"
    classification = "classification"
    regression = "regression"
    preference = "preference"


# Which dataset formats each task trains on with supervised fine-tuning (preference data needs DPO).
TASK_FORMATS: dict[str, set[Format]] = {
    "causal_lm": {Format.chat, Format.prompt_completion, Format.text},
    "classification": {Format.classification},
    "regression": {Format.regression},
    "masked_lm": {Format.text, Format.classification, Format.regression},
}

CHAT_ROLES = {"system", "user", "assistant", "tool", "developer"}
PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output")


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
    if keys & set(PREFERENCE_KEYS):
        return Format.preference
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
        "text | text+label | text+value | input+preferred_output+non_preferred_output"
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
    out = _normalize_messages(obj.get("messages"), "messages")
    if not any(m["role"] == "assistant" and m["weight"] for m in out):
        raise RecordError("a chat example needs at least one assistant message to learn from", "messages")
    return {"messages": out}


def _normalize_messages(msgs: Any, path: str) -> list[dict[str, Any]]:
    if not isinstance(msgs, list) or not msgs:
        raise RecordError(f"'{path}' must be a non-empty list", path)
    out = []
    for i, m in enumerate(msgs):
        where = f"{path}[{i}]"
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
    return out


def _normalize_preference(obj: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's DPO record -> {"messages": the prompt (no turn learned), "chosen": str, "rejected": str}."""
    for key in PREFERENCE_KEYS:
        if key not in obj:
            raise RecordError(f"missing required field '{key}' (a preference record needs "
                              f"{', '.join(PREFERENCE_KEYS)})", key)
    prompt = obj["input"]
    if not isinstance(prompt, dict):
        raise RecordError("'input' must be an object with 'messages'", "input")
    messages = [m | {"weight": 0} for m in _normalize_messages(prompt.get("messages"), "input.messages")]
    chosen = _preference_output(obj["preferred_output"], "preferred_output")
    rejected = _preference_output(obj["non_preferred_output"], "non_preferred_output")
    if chosen.strip() == rejected.strip():
        raise RecordError("'preferred_output' and 'non_preferred_output' are identical: the pair teaches "
                          "nothing", "non_preferred_output")
    return {"messages": messages, "chosen": chosen, "rejected": rejected}


def _preference_output(value: Any, key: str) -> str:
    """One assistant message with non-empty text content (OpenAI's shape: a list of one message)."""
    if not isinstance(value, list) or len(value) != 1:
        raise RecordError(f"'{key}' must be a list of exactly one assistant message", key)
    message = value[0]
    where = f"{key}[0]"
    if not isinstance(message, dict):
        raise RecordError(f"'{where}' must be an object", where)
    if message.get("role") != "assistant":
        raise RecordError(f"'{where}.role' must be 'assistant', got {message.get('role')!r}", f"{where}.role")
    content = message.get("content")
    if isinstance(content, list):  # OpenAI content parts: keep the text parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise RecordError(f"'{where}.content' must be a string", f"{where}.content")
    if not content.strip():
        raise RecordError(f"'{where}.content' must not be empty", f"{where}.content")
    return content


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
    if found is Format.preference:
        return found, _normalize_preference(obj)
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
        if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
            raise RecordError("'value' must be a finite number", "value")
        return found, {"text": text, "value": float(value)}
    return found, {"text": text}


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past float's range
        return False


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

    def add_block(self, b: BlockStats) -> None:
        """`add` for a block of records the fast path accepted (same totals, same order)."""
        self.rows += b.rows
        self.chars += b.chars
        for label, count in b.labels.items():
            self.labels[label] = self.labels.get(label, 0) + count
        if b.values:
            lo, hi = min(b.values), max(b.values)
            self.value_min = lo if self.value_min is None else min(self.value_min, lo)
            self.value_max = hi if self.value_max is None else max(self.value_max, hi)

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
    if fmt is Format.preference:
        return sum(len(m["content"]) for m in rec["messages"]) + len(rec["chosen"]) + len(rec["rejected"])
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
        except RecursionError:
            self.error(line, "invalid JSON: nested too deeply")
            return
        except ValueError:  # int() refuses over sys.get_int_max_str_digits() digits
            self.error(line, f"invalid JSON: a number has too many digits (at most {sys.get_int_max_str_digits()})")
            return
        if bad := find_bad_text(obj):
            field, problem = bad
            self.error(line, f"a value {problem}" if field is None else f"the value {problem}", field)
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


def _line_text(v: Validator, n: int, raw: bytes) -> str | None:
    """The decoded line, or None once its error is reported; raises _Fatal on binary content."""
    if b"\x00" in raw:
        raise _Fatal(n, f"binary content (NUL byte at column {raw.index(0) + 1}); "
                        "upload UTF-8 text: JSONL or CSV")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        v.error(n, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
        return None


def _long_line(v: Validator, n: int, max_line_bytes: int) -> None:
    v.error(n, f"line is longer than the {max_line_bytes}-byte limit")


def _physical_lines(fh: IO[bytes], v: Validator, max_line_bytes: int, first: int = 1,
                    count: int | None = None) -> Iterator[tuple[int, str]]:
    """(line number, decoded text incl. newline) for up to `count` lines numbered from `first`;
    bad lines are reported and skipped."""
    n = first - 1
    while not v.full and (count is None or n < first - 1 + count) and (raw := fh.readline(max_line_bytes + 1)):
        n += 1
        if n == 1:
            raw = raw.removeprefix(BOM)
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            _skip_rest_of_line(fh)
            _long_line(v, n, max_line_bytes)
            continue
        if (text := _line_text(v, n, raw)) is not None:
            yield n, text


def _jsonl_line(v: Validator, n: int, text: str) -> None:
    if n == 1 and text.lstrip().startswith("["):
        raise _Fatal(1, "the file looks like a JSON array; upload JSON Lines: one JSON object per line")
    v.json_line(n, text)


def _no_records(v: Validator, last: int) -> None:
    if v.report.rows == 0 and v.report.error_count == 0:
        v.error(max(last, 1), "no records: the file contains only blank lines")


def _scan_jsonl(lines: Iterator[tuple[int, str]], v: Validator) -> None:
    """The detailed scan: every line through `Validator.json_line`."""
    last = 0
    for n, text in lines:
        last = n
        _jsonl_line(v, n, text)
        if v.full:
            return
    _no_records(v, last)


BLOCK_BYTES = 1 << 16  # records of a block stay in CPU caches
FAST_MISSES = 32
NUL_ESCAPE = b"\\u0000"  # the only way a NUL reaches a parsed JSON string (raw NULs are fatal)


class _FastScan:
    """The same scan, a block of lines at a time: a block of well-formed records of the file's
    format goes through `FastChecker` in one go; any other block is re-checked line by line,
    and lines the fast check refuses get the detailed validator, so errors are the same."""

    def __init__(self, fh: IO[bytes], v: Validator, max_line_bytes: int) -> None:
        self.fh, self.v, self.max_line_bytes = fh, v, max_line_bytes
        self.checker: FastChecker | None = None

    def run(self) -> None:
        n = 0  # lines done
        while not self.v.full:
            start, block, end = self.read_block()
            if not block:
                break
            if n == 0 or (end == 0 and len(block) > self.max_line_bytes):
                # line 1 (BOM, JSON array) and over-long lines: read as the detailed scan does
                self.fh.seek(start)
                for m, text in _physical_lines(self.fh, self.v, self.max_line_bytes, n + 1, 1):
                    _jsonl_line(self.v, m, text)
                n += 1
                continue
            if 0 < end < len(block):
                block = block[:end]
                self.fh.seek(start + end)
            lines = block.split(b"\n")
            if end:
                lines.pop()  # after the final newline
            self.block(n + 1, block, lines, newline=end > 0)
            n += len(lines)
        if not self.v.full:
            _no_records(self.v, n)

    def read_block(self) -> tuple[int, bytes, int]:
        """(offset, bytes, end of the last whole line in them): about BLOCK_BYTES, more while no
        line ends, up to the line limit (a longer line is the caller's to skip)."""
        start = self.fh.tell()
        block = self.fh.read(BLOCK_BYTES)
        end = block.rfind(b"\n") + 1
        while not end and len(block) <= self.max_line_bytes and (more := self.fh.read(len(block))):
            newline = more.rfind(b"\n")
            end = len(block) + newline + 1 if newline >= 0 else 0
            block += more
        return start, block, end

    def fast(self, lines: list[bytes]) -> BlockStats | None:
        fmt = self.v.report.format
        if fmt is None:
            return None
        if self.checker is None:
            self.checker = FastChecker(fmt)
        try:
            return self.checker.lines(lines)
        except Reject:
            return None

    def block(self, first: int, block: bytes, lines: list[bytes], newline: bool) -> None:
        if NUL_ESCAPE not in block and max(map(len, lines)) <= self.max_line_bytes:
            stats = self.fast(list(filter(None, lines)))  # empty lines are blank: skipped
            if stats is not None:
                self.v.report.add_block(stats)
                return
        last = first + len(lines) - 1
        misses = 0  # fast tries refused in a row: past FAST_MISSES, this block is all detail
        for n, raw in enumerate(lines, first):
            if self.v.full:
                return
            if len(raw) > self.max_line_bytes:
                _long_line(self.v, n, self.max_line_bytes)
                continue
            if misses < FAST_MISSES and raw and NUL_ESCAPE not in raw:
                if (stats := self.fast([raw])) is not None:
                    self.v.report.add_block(stats)
                    misses = 0
                    continue
                misses += 1
            if (text := _line_text(self.v, n, raw)) is not None:
                # with its newline, as the detailed scan reads it (JSON error columns depend on it)
                self.v.json_line(n, text + "\n" if newline or n < last else text)


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
                  sniffed: bool = False, fast: bool = True) -> Report:
    """Check a whole JSONL/CSV file line by line. Errors (with line numbers) land in the report;
    scanning stops after `max_errors`. `sniffed`: the kind was guessed from the content.
    `fast=False` checks every JSONL line in detail (the reference the fast scan must match)."""
    v = Validator(kind, max_errors)
    with open(path, "rb") as fh:
        head = fh.read(2)
        fh.seek(0)
        try:
            if not head:
                raise _Fatal(1, "the file is empty")
            if head in (b"\xff\xfe", b"\xfe\xff"):
                raise _Fatal(1, "the file is UTF-16 encoded; save it as UTF-8")
            if kind == "csv":
                _scan_csv(_physical_lines(fh, v, max_line_bytes), v, max_line_bytes, sniffed)
            elif fast:
                _FastScan(fh, v, max_line_bytes).run()
            else:
                _scan_jsonl(_physical_lines(fh, v, max_line_bytes), v)
        except _Fatal as e:
            v.error(e.line, e.message)
    v.report.truncated = v.full
    return v.report
