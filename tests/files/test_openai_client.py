"""The official `openai` client against the Files API (its HTTP client is the app's TestClient)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from . import CHAT, jsonl


@pytest.fixture
def oai(client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(api_key=client.api_key, base_url="http://testserver/v1",  # type: ignore[attr-defined]
                         http_client=client, max_retries=0)


def test_openai_files_round_trip(oai: openai.OpenAI, tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(CHAT, CHAT, CHAT))
    with open(path, "rb") as fh:
        created = oai.files.create(file=fh, purpose="fine-tune")
    assert created.object == "file" and created.filename == "train.jsonl" and created.status == "processed"
    assert created.bytes == path.stat().st_size and created.purpose == "fine-tune"
    assert created.model_extra is not None and created.model_extra["rows"] == 3

    assert oai.files.retrieve(created.id).id == created.id
    assert [f.id for f in oai.files.list()] == [created.id]
    assert oai.files.content(created.id).read() == path.read_bytes()

    deleted = oai.files.delete(created.id)
    assert deleted.id == created.id and deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(created.id)


def test_openai_list_auto_paginates(oai: openai.OpenAI) -> None:
    ids = {oai.files.create(file=(f"{i}.jsonl", jsonl({"text": str(i)})), purpose="fine-tune").id
           for i in range(5)}
    assert {f.id for f in oai.files.list(limit=2)} == ids


def test_openai_errors(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        oai.files.create(file=("bad.jsonl", b'{"text": "a"}\n{nope}\n'), purpose="fine-tune")
    assert exc.value.code == "invalid_file_format" and exc.value.param == "file"
    assert "line 2" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        oai.files.create(file=("a.jsonl", jsonl({"text": "a"})), purpose="batch")
    assert exc.value.param == "purpose"
