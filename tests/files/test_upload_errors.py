"""Malformed uploads: a 4xx naming the line (and field), nothing stored, no row written."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.kit.storage import get_storage
from app.orm import File
from app.settings import get_settings

from . import CHAT, error_of, jsonl, upload

OK = jsonl({"text": "fine"})
BAD = [
    ("bad_json", "a.jsonl", OK + b'{"text": "x",}\n', "line 2: invalid JSON", None),
    ("bad_schema", "a.jsonl", jsonl(CHAT, CHAT, {"messages": [{"role": "robot", "content": "x"}]}),
     "line 3, field 'messages[0].role'", "messages[0].role"),
    ("missing_field", "a.jsonl", jsonl({"text": "a", "label": "x"}, {"text": "", "label": "y"}),
     "line 2, field 'text'", "text"),
    ("mixed", "a.jsonl", jsonl({"text": "a"}, {"text": "b"}, CHAT), "line 3: expected a text record", None),
    ("not_object", "a.jsonl", OK + b"42\n", "line 2: each line must be a JSON object", None),
    ("utf8", "a.jsonl", OK + OK + b'{"text": "caf\xe9"}\n',
     "line 3: not valid UTF-8 (byte 0xe9 at column 14)", None),
    ("binary", "a.jsonl", OK + b"\x1f\x8b\x08\x00\x00\x00", "line 2: binary content", None),
    ("utf16", "a.jsonl", "\ufeff{}\n".encode("utf-16"), "line 1: the file is UTF-16", None),
    ("empty", "a.jsonl", b"", "line 1: the file is empty", None),
    ("blank", "a.jsonl", b"\n\n  \n", "line 3: no records", None),
    ("array", "a.json", b'[{"text": "a"}]\n', "line 1: the file looks like a JSON array", None),
    ("csv_header", "a.csv", b"foo,bar\n1,2\n", "line 1: CSV header must name columns", None),
    ("csv_cols", "a.csv", b"text,label\na,b\nc,d,e\n", "line 3: expected 2 columns", None),
    ("csv_value", "a.csv", b"text,value\na,1\n\nb,high\n", "line 4, field 'value'", "value"),
    ("csv_only_header", "a.csv", b"text,label\n", "line 2: no data rows", None),
    ("sniffed_garbage", "notes.txt", b"hello world\n", "line 1: neither JSON Lines", None),
]


@pytest.fixture
def small_line_limit(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setattr(get_settings(), "max_line_bytes", 64)
    yield 64


def _nothing_stored(db: Session) -> None:
    assert db.scalar(select(func.count()).select_from(File)) == 0
    staging = Path(get_storage().staging_dir())
    assert not list(staging.glob("*.upload")), "temp upload left behind"


@pytest.mark.parametrize(("case", "name", "data", "needle", "field"), BAD, ids=[c[0] for c in BAD])
def test_malformed(client: TestClient, db: Session, case: str, name: str, data: bytes, needle: str,
                   field: str | None) -> None:
    r = upload(client, name, data)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["message"].startswith("Invalid file format: ") and needle in err["message"], err["message"]
    assert (err["param"], err["code"]) == ("file", "invalid_file_format")
    assert err["type"] == "invalid_request_error"
    first = err["details"][0]
    assert f"line {first['line']}" in needle and first["field"] == field
    _nothing_stored(db)


def test_line_too_long(client: TestClient, db: Session, small_line_limit: int) -> None:
    data = OK + jsonl({"text": "x" * 100}) + OK
    err = error_of(upload(client, "a.jsonl", data))
    assert "line 2: line is longer than the 64-byte limit" in err["message"]
    assert len(err["details"]) == 1  # line 3 is read normally after skipping line 2
    _nothing_stored(db)


def test_csv_unbalanced_quote(client: TestClient, db: Session, small_line_limit: int) -> None:
    data = b'text,label\na,b\n"open,x\n' + b"more,text\n" * 100
    err = error_of(upload(client, "a.csv", data))
    assert "line 3: CSV record is longer than the 64-byte limit (unbalanced quote?)" in err["message"]
    _nothing_stored(db)


def test_all_errors_listed_up_to_the_cap(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "max_errors_reported", 5)
    data = OK + b"{oops\n" * 3 + jsonl({"text": 1})
    err = error_of(upload(client, "a.jsonl", data))
    assert [d["line"] for d in err["details"]] == [2, 3, 4, 5]
    assert err["details"][3] == {"line": 5, "field": "text", "message": "'text' must be a string, got int"}
    assert "(and 3 more errors in 'details')" in err["message"]
    err = error_of(upload(client, "a.jsonl", OK + b"{oops\n" * 50))
    assert len(err["details"]) == 5 and "showing the first 5 errors" in err["message"]


def test_file_too_large(client: TestClient, db: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "max_upload_bytes", 100)
    r = upload(client, "a.jsonl", OK * 10)
    assert r.status_code == 413
    err = error_of(r)
    assert (err["code"], err["param"]) == ("file_too_large", "file") and "100 bytes" in err["message"]
    _nothing_stored(db)
    assert upload(client, "a.jsonl", OK * 5).status_code == 200  # 80 bytes: under the cap


def test_too_large_by_content_length(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "max_upload_bytes", 100)
    r = client.post("/v1/files", content=b"x" * (2 << 20),
                    headers={"Content-Type": "multipart/form-data; boundary=abc"})
    assert r.status_code == 413 and error_of(r)["code"] == "file_too_large"


@pytest.mark.parametrize("purpose", ["batch", "fine-tune-results", "assistants", ""])
def test_bad_purpose(client: TestClient, db: Session, purpose: str) -> None:
    r = upload(client, "a.jsonl", OK, purpose=purpose)
    assert r.status_code == 400 and error_of(r)["param"] == "purpose"
    _nothing_stored(db)


def test_missing_purpose(client: TestClient) -> None:
    r = upload(client, "a.jsonl", OK, purpose=None)
    err = error_of(r)
    assert r.status_code == 400 and (err["param"], err["code"]) == ("purpose", "missing_required_parameter")


def test_missing_file_part(client: TestClient) -> None:
    r = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"other": ("x.jsonl", OK)})
    err = error_of(r)
    assert r.status_code == 400 and (err["param"], err["code"]) == ("file", "missing_required_parameter")


def test_not_multipart(client: TestClient) -> None:
    r = client.post("/v1/files", json={"purpose": "fine-tune"})
    assert r.status_code == 415


def test_truncated_multipart(client: TestClient, db: Session) -> None:
    body = (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n' + OK)
    r = client.post("/v1/files", content=body, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_multipart"
    _nothing_stored(db)


def test_garbage_multipart(client: TestClient, db: Session) -> None:
    r = client.post("/v1/files", content=b"this is not multipart at all",
                    headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_multipart"
    _nothing_stored(db)


def test_two_file_parts(client: TestClient) -> None:
    r = client.post("/v1/files", data={"purpose": "fine-tune"},
                    files=[("file", ("a.jsonl", OK)), ("file", ("b.jsonl", OK))])
    assert r.status_code == 400 and error_of(r)["param"] == "file"


def test_needs_api_key(app: object) -> None:
    r = TestClient(app).post("/v1/files", files={"file": ("a.jsonl", OK)}, data={"purpose": "fine-tune"})  # type: ignore[arg-type]
    assert r.status_code == 401
