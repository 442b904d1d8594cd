"""Validator and trainer iterator agree: whatever validates is read back record for record."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml.data.formats import Format, iter_records, sniff_kind, validate_file
from tests.files import CHAT, jsonl

GOOD = [
    ("chat", "jsonl", b"\xef\xbb\xbf" + jsonl(CHAT, CHAT).replace(b"\n", b"\r\n"), Format.chat, 2),
    ("cls_int", "jsonl", jsonl({"text": "a", "label": 3}, {"text": "b", "label": "3"}),
     Format.classification, 2),
    ("csv_multiline", "csv", b'text,label\r\n"a\r\nb",x\r\n\r\n"say ""hi""",y\r\n', Format.classification, 2),
    ("csv_big_field", "csv", b"text,value\n" + b"z" * 300_000 + b",1\n", Format.regression, 1),
    ("reg_str_value", "jsonl", jsonl({"text": "a", "value": "2.5"}), Format.regression, 1),
]


@pytest.mark.parametrize(("case", "kind", "data", "fmt", "rows"), GOOD, ids=[g[0] for g in GOOD])
def test_validated_files_iterate(tmp_path: Path, case: str, kind: str, data: bytes, fmt: Format,
                                 rows: int) -> None:
    path = tmp_path / f"f.{kind}"
    path.write_bytes(data)
    report = validate_file(path, kind, max_line_bytes=1 << 20)
    assert report.errors == [] and (report.format, report.rows) == (fmt, rows)
    assert len(list(iter_records(path, kind))) == rows


def test_csv_records_are_normalized(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    path.write_bytes(b'Text,Label\n"a\nb",x\n')
    assert list(iter_records(path, "csv")) == [{"text": "a\nb", "label": "x"}]


def test_error_lines_follow_physical_lines(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    path.write_bytes(b'text,value\n"two\nlines",1\nbad,nan-ish\n')
    report = validate_file(path, "csv", max_line_bytes=1 << 20)
    assert [(e.line, e.field) for e in report.errors] == [(4, "value")]


def test_scan_stops_at_max_errors(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"{bad\n" * 1000)
    report = validate_file(path, "jsonl", max_line_bytes=100, max_errors=3)
    assert [e.line for e in report.errors] == [1, 2, 3] and report.truncated


@pytest.mark.parametrize(("name", "head", "kind"), [
    ("a.CSV", b"{", "csv"), ("a.ndjson", b"x", "jsonl"), ("a", b"\xef\xbb\xbf  {", "jsonl"),
    ("a.txt", b"text,label", "csv"), ("", b"[", "jsonl"),
])
def test_sniff_kind(name: str, head: bytes, kind: str) -> None:
    assert sniff_kind(name, head) == kind
