"""Well-formed but hostile input (NUL bytes, lone surrogates, absurd nesting, huge numbers) is the
caller's mistake: a 400 in the OpenAI error shape naming where it is, never a 500."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from app.main import create_app
from app.orm import Project
from tests.files import CHAT, jsonl, upload
from tests.jobs.factories import make_file

DEEP = "[" * 10_000 + "]" * 10_000
HUGE = "9" * 5_000


@pytest.fixture
def chat_file(db: Session, project_client: tuple[TestClient, Project]) -> str:
    return make_file(db, project_client[1], "chat", rows=40).id


def _error(r: Any, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def _raw_post(client: TestClient, path: str, body: str) -> Any:
    return client.post(path, content=body.encode("utf-8", "surrogatepass"),
                       headers={"Content-Type": "application/json"})


def _job_json(chat_file: str, extra: str) -> str:
    return f'{{"model": "tiny-lm", "training_file": "{chat_file}", {extra}}}'


# --- NUL bytes: Postgres refuses them in text (DataError) ---------------------------------------

@pytest.mark.parametrize(("field", "value"), [
    ("training_file", "file-\x00"),
    ("validation_file", "file-\x00x"),
    ("from_checkpoint", "ftckpt-\x00"),
    ("model", "tiny\x00lm"),
    ("suffix", "a\x00"),
])
def test_nul_in_job_body_field(client: TestClient, chat_file: str, field: str, value: str) -> None:
    body = {"model": "tiny-lm", "training_file": chat_file, field: value}
    err = _error(client.post("/v1/fine_tuning/jobs", json=body), field)
    assert "NUL" in err["message"]


@pytest.mark.parametrize("metadata", [{"team": "a\x00b"}, {"te\x00am": "x"}])
def test_nul_in_metadata(client: TestClient, chat_file: str, metadata: dict[str, str]) -> None:
    body = {"model": "tiny-lm", "training_file": chat_file, "metadata": metadata}
    err = _error(client.post("/v1/fine_tuning/jobs", json=body))
    assert err["param"].startswith("metadata"), err


@pytest.mark.parametrize("path", ["/v1/files", "/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/ftjob-x/events",
                                  "/v1/fine_tuning/jobs/ftjob-x/checkpoints"])
def test_nul_in_after(client: TestClient, path: str) -> None:
    err = _error(client.get(path, params={"after": "x\x00y"}), "after")
    assert "NUL" in err["message"]


def test_nul_in_metadata_query_filter(client: TestClient) -> None:
    _error(client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "\x00"}), "metadata[team]")


@pytest.mark.parametrize(("path", "param"), [
    ("/v1/files/file-%00", "file_id"),
    ("/v1/files/file-%00/content", "file_id"),
    ("/v1/fine_tuning/jobs/ftjob-%00", "job_id"),
    ("/v1/fine_tuning/jobs/ftjob-%00/cancel", "job_id"),
    ("/v1/models/ft:%00", "model"),
])
def test_nul_in_path_segment(client: TestClient, path: str, param: str) -> None:
    method = "post" if path.endswith("/cancel") else "get"
    err = _error(client.request(method, path), param)
    assert "NUL" in err["message"]


def test_nul_in_idempotency_key_header(client: TestClient, chat_file: str) -> None:
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-lm", "training_file": chat_file},
                    headers={"Idempotency-Key": "k\x00"})
    _error(r, "Idempotency-Key")


# --- lone surrogates: not encodable as UTF-8 (Postgres, tokenizers, the response itself) ----------

def test_lone_surrogate_in_metadata(client: TestClient, chat_file: str) -> None:
    body = _job_json(chat_file, '"metadata": {"team": "\\ud800"}')
    err = _error(_raw_post(client, "/v1/fine_tuning/jobs", body), "metadata.team")
    assert "surrogate" in err["message"]


def test_lone_surrogate_in_chat_message(client: TestClient) -> None:
    body = '{"model": "tiny-lm", "messages": [{"role": "user", "content": "hi \\udfff"}]}'
    err = _error(_raw_post(client, "/v1/chat/completions", body), "messages[0].content")
    assert "surrogate" in err["message"]


def test_paired_surrogates_are_fine(client: TestClient, chat_file: str) -> None:
    body = _job_json(chat_file, '"metadata": {"team": "\\ud83d\\ude00"}')
    r = _raw_post(client, "/v1/fine_tuning/jobs", body)
    assert r.status_code == 200, r.text
    assert r.json()["metadata"] == {"team": "\U0001f600"}


# --- absurd JSON: nesting past the recursion limit, numbers past int's digit limit ---------------

@pytest.mark.parametrize(("path", "needle"), [
    ("/v1/fine_tuning/jobs", "nested"), ("/v1/chat/completions", "nested"), ("/v1/predictions", "nested"),
])
def test_deeply_nested_body(client: TestClient, path: str, needle: str) -> None:
    err = _error(_raw_post(client, path, DEEP))
    assert needle in err["message"]


def test_deeply_nested_body_field(client: TestClient, chat_file: str) -> None:
    body = _job_json(chat_file, f'"integrations": [{DEEP}]')
    assert "nested" in _error(_raw_post(client, "/v1/fine_tuning/jobs", body))["message"]


def test_huge_number_in_body(client: TestClient, chat_file: str) -> None:
    body = _job_json(chat_file, f'"seed": {HUGE}')
    assert "digits" in _error(_raw_post(client, "/v1/fine_tuning/jobs", body))["message"]


# --- uploads: the offending line is named -------------------------------------------------------

LABELLED = {"text": "fine", "label": "x"}


@pytest.mark.parametrize(("first", "line", "needle"), [
    (LABELLED, '{"text": "a", "label": "\\ud800"}', "surrogate"),
    ({"text": "fine"}, '{"text": "a\\u0000b"}', "NUL"),
    (LABELLED, '{"text": "a", "label": "x\\u0000"}', "NUL"),
    (CHAT, '{"messages": [{"role": "user", "content": "\\udc00"}]}', "surrogate"),
    (LABELLED, '{"text": "a", "extra": ' + DEEP + "}", "nested"),
    ({"text": "a", "value": 1}, '{"text": "a", "value": ' + HUGE + "}", "digits"),
])
def test_hostile_upload_line(client: TestClient, first: dict[str, Any], line: str, needle: str) -> None:
    err = _error(upload(client, "a.jsonl", jsonl(first) + line.encode() + b"\n"), "file")
    assert "line 2" in err["message"] and needle in err["message"], err


def test_huge_number_in_query(client: TestClient) -> None:
    _error(client.get("/v1/files", params={"limit": HUGE}), "limit")


# --- whatever slips past: Postgres refusing a value is still the input's fault ---------------------

def test_database_data_error_is_a_400(session_factory: sessionmaker[Session]) -> None:
    application = create_app()

    @application.get("/boom")
    def boom() -> None:
        with session_factory() as s:
            s.execute(text("SELECT CAST(:v AS integer)"), {"v": str(2**40)})

    _error(TestClient(application).get("/boom"))


def test_hostile_upload_line_names_the_field(client: TestClient) -> None:
    line = b'{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "\\ud800"}]}\n'
    err = _error(upload(client, "a.jsonl", jsonl(CHAT) + line), "file")
    assert err["details"][0] == {"line": 2, "field": "messages[1].content",
                                 "message": "the value contains an unpaired surrogate (not valid Unicode)"}
