"""OpenAI's preference (DPO) format at upload: accepted as `preference`, refused line by line with the
field named, like every other format."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from . import CHAT, error_of, jsonl, upload


def pair(**changes: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "input": {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
        "preferred_output": [{"role": "assistant", "content": "Hello! How can I help?"}],
        "non_preferred_output": [{"role": "assistant", "content": "What."}],
    }
    return {k: v for k, v in (rec | changes).items() if v is not None}


def test_preference_file_is_accepted(client: TestClient) -> None:
    multi_turn = pair(input={"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                          {"role": "user", "content": "how are you?"}]})
    r = upload(client, "prefs.jsonl", jsonl(pair(), multi_turn, pair()))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["format"] == "preference" and body["rows"] == 3


BAD = [
    ("missing_key", pair(non_preferred_output=None), "missing required field 'non_preferred_output'",
     "non_preferred_output"),
    ("missing_input", pair(input=None), "missing required field 'input'", "input"),
    ("input_not_object", pair(input=[{"role": "user", "content": "hi"}]), "'input' must be an object", "input"),
    ("empty_messages", pair(input={"messages": []}), "'input.messages' must be a non-empty list", "input.messages"),
    ("bad_role_in_input", pair(input={"messages": [{"role": "robot", "content": "x"}]}), "must be one of",
     "input.messages[0].role"),
    ("empty_output", pair(preferred_output=[]), "must be a list of exactly one assistant message",
     "preferred_output"),
    ("two_outputs", pair(non_preferred_output=[{"role": "assistant", "content": "a"}] * 2),
     "exactly one assistant message", "non_preferred_output"),
    ("user_role", pair(preferred_output=[{"role": "user", "content": "Hello"}]), "must be 'assistant', got 'user'",
     "preferred_output[0].role"),
    ("blank_content", pair(non_preferred_output=[{"role": "assistant", "content": "  "}]), "must not be empty",
     "non_preferred_output[0].content"),
    ("identical", pair(non_preferred_output=[{"role": "assistant", "content": "Hello! How can I help? "}]),
     "are identical", "non_preferred_output"),
]


@pytest.mark.parametrize(("case", "record", "needle", "field"), BAD, ids=[c[0] for c in BAD])
def test_bad_pairs_name_line_and_field(client: TestClient, case: str, record: dict[str, Any], needle: str,
                                       field: str) -> None:
    r = upload(client, "prefs.jsonl", jsonl(pair(), pair(), record))
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["code"] == "invalid_file_format" and err["param"] == "file"
    assert f"line 3, field '{field}'" in err["message"] and needle in err["message"], err["message"]


def test_mixing_pairs_and_chats_is_refused(client: TestClient) -> None:
    r = upload(client, "prefs.jsonl", jsonl(pair(), CHAT))
    assert r.status_code == 400
    assert "line 2: expected a preference record like the first line, got chat" in error_of(r)["message"]
