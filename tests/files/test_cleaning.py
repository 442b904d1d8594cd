"""Dataset cleaning: each rule on normalized records of every format, and POST /v1/files/{id}/clean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ml.data.cleaning import CleaningOptions, clean_records, scrub
from ml.data.formats import normalize

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def recs(*rows: dict[str, Any]) -> list[dict[str, Any]]:
    return [normalize(r)[1] for r in rows]


def chat(user: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def clean(rows: list[dict[str, Any]], **options: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    kept, report = clean_records(rows, CleaningOptions(drop_empty=False, **options))
    return kept, report.as_dict()


# --- rules --------------------------------------------------------------------------------------

def test_exact_duplicates_all_formats() -> None:
    rows = recs({"text": "a b", "label": "x"}, {"text": "a b", "label": "x"}, {"text": "a b", "label": "y"},
                {"text": "A b", "label": "x"})
    kept, report = clean(rows, dedupe=True)
    assert [r["label"] for r in kept] == ["x", "y", "x"]  # another label / another case is not exact
    assert report["removed"]["exact_duplicates"] == 1 and report["output_rows"] == 3
    for fmt_rows in ([chat("hi", "yo"), chat("hi", "yo")], [{"prompt": "p", "completion": "c"}] * 2,
                     [{"text": "t"}] * 2, [{"text": "t", "value": 1}] * 2):
        assert len(clean(recs(*fmt_rows), dedupe=True)[0]) == 1


def test_near_duplicates() -> None:
    base = "Please reset my password, I forgot it yesterday and cannot log in to my account."
    rows = recs(
        {"text": base, "label": "support"},
        {"text": "PLEASE reset my password -- I forgot it yesterday, and cannot log in to my account!",
         "label": "support"},  # case / punctuation / spacing only
        {"text": base.replace("cannot", "can't"), "label": "support"},  # one word changed: MinHash
        {"text": base, "label": "billing"},  # same text, other label: kept
        {"text": "My invoice shows a charge twice for the same month of service.", "label": "support"},
    )
    kept, report = clean(rows, near_dedupe=True)
    assert [r["label"] for r in kept] == ["support", "billing", "support"]
    assert report["removed"]["near_duplicates"] == 2
    assert kept[2]["text"].startswith("My invoice")


def test_near_duplicates_in_chat_and_prompt_completion() -> None:
    rows = recs(chat("What is the capital of France?", "The capital of France is Paris."),
                chat("what is the capital of france", "The capital of France is Paris"),
                chat("What is the capital of Spain?", "The capital of Spain is Madrid."))
    assert len(clean(rows, near_dedupe=True)[0]) == 2
    pc = recs({"prompt": "Color of the sky:", "completion": " blue"},
              {"prompt": "Color of the sky :", "completion": " Blue."},
              {"prompt": "Color of the grass:", "completion": " green"})
    assert len(clean(pc, near_dedupe=True)[0]) == 2


def test_empty_examples() -> None:
    rows = recs({"text": "\u200b \u200b", "label": "x"}, {"text": "fine", "label": "x"},
                chat("hello", "\u200b"),  # a zero-width assistant answer passes validation
                {"prompt": "", "completion": "\u2060"}, {"prompt": "", "completion": "ok"})
    kept, report = clean_records(rows, CleaningOptions.model_validate({}))  # drop_empty is on by default
    assert [r.get("text") or r.get("completion") for r in kept] == ["fine", "ok"]
    assert report.removed["empty"] == 3


def test_too_long_chars_and_tokens() -> None:
    rows = recs({"text": "x" * 10}, {"text": "y" * 11}, chat("abcde", "fghij"), chat("abcde", "fghijk"))
    kept, report = clean(rows, max_chars=10)
    assert len(kept) == 2 and report["removed"]["too_long"] == 2
    words = recs({"text": "one two three"}, {"text": "one two three four"})
    options = CleaningOptions.model_validate({"max_tokens": 3, "model": "tiny-lm"})
    short, counted = clean_records(words, options, count_tokens=lambda s: len(s.split()))
    assert [r["text"] for r in short] == ["one two three"] and counted.removed["too_long"] == 1


@pytest.mark.parametrize(("text", "expected", "kind"), [
    ("mail john.doe+news@mail.example.co.uk today", "mail <EMAIL> today", "email"),
    ("call +1 (555) 123-4567.", "call <PHONE>.", "phone"),
    ("call 555-123-4567 or +44 20 7946 0958", "call <PHONE> or <PHONE>", "phone"),
    ("ring +33 1 23 45 67 89 / +4915112345678", "ring <PHONE> / <PHONE>", "phone"),
    ("IBAN DE89 3704 0044 0532 0130 00, ok", "IBAN <IBAN>, ok", "iban"),
    ("iban GB82WEST12345698765432", "iban <IBAN>", "iban"),
    ("card 4111 1111 1111 1111 exp 12/27", "card <CREDIT_CARD> exp 12/27", "credit_card"),
    ("card 4111111111111111.", "card <CREDIT_CARD>.", "credit_card"),
    ("from 192.168.1.20 and 10.0.0.1.", "from <IP_ADDRESS> and <IP_ADDRESS>.", "ip_address"),
])
def test_pii_is_scrubbed(text: str, expected: str, kind: str) -> None:
    counts: dict[str, int] = {}
    assert scrub(text, counts) == expected
    assert set(counts) == {kind}


@pytest.mark.parametrize("text", [
    "On 2024-01-15 or 15.01.2024 at 10:30", "from 1990-2000", "prices 12.50 10.30 9.99",
    "10 000 000 people, 1,234,567 votes", "version 1.2.3 and pi 3.14159", "order 1234567890123",
    "call me maybe", "room 101, floor 5", "IP 999.1.1.1",
])
def test_pii_leaves_ordinary_numbers(text: str) -> None:
    counts: dict[str, int] = {}
    assert scrub(text, counts) == text and not counts


def test_scrubbing_covers_every_text_field_and_counts() -> None:
    rows = recs(chat("I am bob@example.com", "Call 555-123-4567"), {"prompt": "a@b.io", "completion": "ok"},
                {"text": "x@y.org from 8.8.8.8", "label": "z"})
    kept, report = clean(rows, scrub_pii=True)
    assert kept[0]["messages"][0]["content"] == "I am <EMAIL>"
    assert kept[0]["messages"][1]["content"] == "Call <PHONE>"
    assert kept[1]["prompt"] == "<EMAIL>" and kept[2] == {"text": "<EMAIL> from <IP_ADDRESS>", "label": "z"}
    assert report["scrubbed"] == {"email": 3, "ip_address": 1, "iban": 0, "credit_card": 0, "phone": 1}


def test_scrub_then_dedupe_and_report_shape() -> None:
    rows = recs({"text": "write to a@x.com"}, {"text": "write to b@y.com"}, {"text": "other"})
    kept, report = clean(rows, scrub_pii=True, dedupe=True)
    assert [r["text"] for r in kept] == ["write to <EMAIL>", "other"]
    assert report == {"input_rows": 3, "output_rows": 2,
                      "removed": {"exact_duplicates": 1, "near_duplicates": 0, "empty": 0, "too_long": 0},
                      "scrubbed": {"email": 2, "ip_address": 0, "iban": 0, "credit_card": 0, "phone": 0}}


def test_near_dedupe_is_deterministic_across_processes() -> None:
    """A resumed job re-cleans its data in a new process: the kept rows must not depend on hash seeds."""
    script = ("import json,random;from ml.data.cleaning import clean_records,CleaningOptions;"
              "r=random.Random(1);w=[''.join(r.choice('abcdefgh') for _ in range(5)) for _ in range(40)];"
              "t=[' '.join(r.choice(w) for _ in range(12)) for _ in range(300)];"
              "t+=[x.replace(x.split()[2],'zz') for x in t[:100]];"
              "k,_=clean_records([{'text':x} for x in t],CleaningOptions(near_dedupe=True));"
              "print(json.dumps([x['text'] for x in k]))")
    cmd = [sys.executable, "-c", script]
    outs = [subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert outs[0] == outs[1] and 200 <= len(json.loads(outs[0])) < 400


# --- POST /v1/files/{id}/clean ------------------------------------------------------------------

def _upload(client: TestClient, body: bytes, name: str = "data.jsonl") -> dict[str, Any]:
    r = client.post("/v1/files", files={"file": (name, body)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return dict(r.json())


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_clean_file_endpoint(client: TestClient, other_client: TestClient) -> None:
    rows = [chat("My mail is ann@example.com", "Noted."), chat("My mail is ann@example.com", "Noted."),
            chat("my mail is ANN@example.com!", "Noted"), chat("Phone?", "It is 555-123-4567."),
            chat("Hi", "Hello there.")]
    src = _upload(client, _jsonl(rows))
    options = {"dedupe": True, "near_dedupe": True, "scrub_pii": True}
    r = client.post(f"/v1/files/{src['id']}/clean", json=options)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] != src["id"] and out["purpose"] == "fine-tune" and out["status"] == "processed"
    assert out["format"] == "chat" and out["rows"] == 3 and out["filename"] == "data.cleaned.jsonl"
    report = out["stats"]["cleaning"]
    assert report["input_rows"] == 5 and report["output_rows"] == 3
    assert report["removed"] == {"exact_duplicates": 1, "near_duplicates": 1, "empty": 0, "too_long": 0}
    assert report["scrubbed"]["email"] == 3 and report["scrubbed"]["phone"] == 1
    assert out["stats"]["source_file"] == src["id"]
    content = client.get(f"/v1/files/{out['id']}/content").text
    assert "ann@example.com" not in content and "<EMAIL>" in content and "<PHONE>" in content
    assert client.get(f"/v1/files/{src['id']}").json()["rows"] == 5  # the source is untouched
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-lm", "training_file": out["id"]})
    assert job.status_code == 200, job.text  # a valid training file
    assert other_client.post(f"/v1/files/{src['id']}/clean", json={}).status_code == 404


def test_clean_csv_file_and_errors(client: TestClient) -> None:
    src = _upload(client, b"text,label\nhello,a\nhello,a\nbye,b\n", "d.csv")
    r = client.post(f"/v1/files/{src['id']}/clean", json={"dedupe": True})
    assert r.status_code == 200 and r.json()["rows"] == 2 and r.json()["format"] == "classification"
    assert r.json()["stats"]["labels"] == {"a": 1, "b": 1}
    assert client.post(f"/v1/files/{src['id']}/clean").status_code == 200  # no body: default options
    r = client.post(f"/v1/files/{src['id']}/clean", json={"max_chars": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "empty_after_cleaning"
    r = client.post(f"/v1/files/{src['id']}/clean", json={"max_tokens": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    long = _upload(client, b"text,label\nhi,a\nthis sentence has many more words than four,b\n", "l.csv")
    r = client.post(f"/v1/files/{long['id']}/clean", json={"max_tokens": 4, "model": "tiny-lm"})
    assert r.status_code == 200 and r.json()["stats"]["cleaning"]["removed"]["too_long"] == 1, r.text
    assert client.post(f"/v1/files/{src['id']}/clean", json={"bogus": 1}).status_code == 400
    assert client.post("/v1/files/file-nope/clean", json={}).status_code == 404
