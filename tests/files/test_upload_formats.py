"""Every supported dataset format uploads, with rows, format and stats on the file object."""

from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.files.upload import clean_filename
from app.kit.storage import get_storage
from app.orm import File

from . import CHAT, jsonl, upload

CASES = [
    ("chat.jsonl", jsonl(CHAT, CHAT), "chat", 2),
    ("pc.jsonl", jsonl({"prompt": "2+2=", "completion": "4"}, {"prompt": "", "completion": "x"}),
     "prompt_completion", 2),
    ("text.jsonl", jsonl({"text": "one"}, {"text": "two"}, {"text": "three"}), "text", 3),
    ("cls.jsonl", jsonl({"text": "a", "label": "pos"}, {"text": "b", "label": "neg"},
                        {"text": "c", "label": "pos"}), "classification", 3),
    ("reg.jsonl", jsonl({"text": "a", "value": 1.5}, {"text": "b", "value": -2}), "regression", 2),
    ("cls.csv", b"text,label\nhello,pos\n\"multi\nline, quoted\",neg\n", "classification", 2),
    ("reg.csv", b"\xef\xbb\xbfText,Value\r\na,1\r\nb,3.5\r\n", "regression", 2),
    ("pc.csv", b"prompt,completion,notes\nq,a,ignored\n", "prompt_completion", 1),
    ("text.csv", b"text\nfirst\n\nsecond\n", "text", 2),
    ("data.txt", b"text,label\nsniffed as csv,x\n", "classification", 1),
    ("noext", jsonl({"text": "sniffed as jsonl"}), "text", 1),
]


@pytest.mark.parametrize(("name", "data", "fmt", "rows"), CASES, ids=[c[0] for c in CASES])
def test_upload_formats(client: TestClient, db: Session, name: str, data: bytes, fmt: str, rows: int) -> None:
    r = upload(client, name, data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "file" and body["id"].startswith("file-")
    assert (body["format"], body["rows"], body["bytes"]) == (fmt, rows, len(data))
    assert body["status"] == "processed" and body["purpose"] == "fine-tune" and body["filename"] == name
    assert body["status_details"] is None and body["expires_at"] is None
    assert isinstance(body["created_at"], int) and body["stats"]["rows"] == rows
    row = db.get(File, body["id"])
    assert row is not None and row.sha256 == hashlib.sha256(data).hexdigest()
    kind = "csv" if name.endswith((".csv", ".txt")) else "jsonl"
    assert row.stats["kind"] == kind and row.storage_key.endswith(f"/{body['id']}.{kind}")
    assert get_storage().exists(row.storage_key)


def test_classification_stats(client: TestClient) -> None:
    data = jsonl(*({"text": f"t{i}", "label": lab} for i, lab in enumerate("aabbbc")),
                 {"text": "x", "label": 7})
    stats = upload(client, "c.jsonl", data).json()["stats"]
    assert stats["labels"] == {"7": 1, "a": 2, "b": 3, "c": 1}


def test_regression_and_csv_stats(client: TestClient) -> None:
    stats = upload(client, "r.csv", b"text,value,extra\na,-1,x\nb,4.5,y\n").json()["stats"]
    assert (stats["value_min"], stats["value_max"]) == (-1.0, 4.5)
    assert stats["columns"] == ["text", "value", "extra"] and stats["kind"] == "csv"


@pytest.mark.parametrize("sent", ["../../etc/evil name.jsonl", "C:\\Users\\me\\evil name.jsonl"])
def test_filename_is_display_only(client: TestClient, db: Session, sent: str) -> None:
    body = upload(client, sent, jsonl({"text": "x"})).json()
    assert body["filename"] == "evil name.jsonl"
    row = db.get(File, body["id"])
    assert row is not None and "evil" not in row.storage_key


@pytest.mark.parametrize(("raw", "clean"), [("a/b/c.jsonl", "c.jsonl"), ("..", "upload"), ("", "upload"),
                                            ("x\x00\x07y.csv", "xy.csv"), ("n" * 300, "n" * 255)])
def test_clean_filename(raw: str, clean: str) -> None:
    assert clean_filename(raw) == clean


def test_unicode_filename_and_content(client: TestClient) -> None:
    data = jsonl({"text": "naïve café ☕"})
    body = upload(client, "données.jsonl", data).json()
    assert body["filename"] == "données.jsonl" and body["rows"] == 1
