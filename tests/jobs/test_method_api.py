"""OpenAI's `method` on job creation: supervised and dpo accepted and echoed, reinforcement a clear 400,
preference files only with DPO, and the official `openai` SDK's `fine_tuning.jobs.create(method=...)`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.orm import Project
from tests.jobs.factories import make_file
from tests.ml.training import datasets as ds


@pytest.fixture
def pref_file(db: Session, project_client: tuple[TestClient, Project]) -> str:
    return make_file(db, project_client[1], "preference", rows=40).id


@pytest.fixture
def chat_file(db: Session, project_client: tuple[TestClient, Project]) -> str:
    return make_file(db, project_client[1], "chat", rows=40).id


def _create(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/fine_tuning/jobs", json=body)


def test_dpo_method_is_stored_and_echoed(client: TestClient, pref_file: str) -> None:
    hp = {"n_epochs": 2, "batch_size": 8, "beta": 0.25}
    r = _create(client, model="tiny-lm", training_file=pref_file,
                method={"type": "dpo", "dpo": {"hyperparameters": hp}})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["method"]["type"] == "dpo"
    assert job["method"]["dpo"]["hyperparameters"] | hp == job["method"]["dpo"]["hyperparameters"]
    assert (job["config"]["method"], job["config"]["beta"]) == ("dpo", 0.25)
    assert job["hyperparameters"]["beta"] == 0.25  # the top-level (deprecated) field mirrors it
    again = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert again["method"] == job["method"]


def test_dpo_beta_auto_and_no_settings(client: TestClient, pref_file: str) -> None:
    for method in ({"type": "dpo"}, {"type": "dpo", "dpo": {"hyperparameters": {"beta": "auto"}}}):
        job = _create(client, model="tiny-lm", training_file=pref_file, method=method).json()
        assert job["method"]["dpo"]["hyperparameters"]["beta"] == 0.1 and job["config"]["beta"] == 0.1


def test_supervised_method_and_top_level_shorthand(client: TestClient, chat_file: str) -> None:
    by_method = _create(client, model="tiny-lm", training_file=chat_file,
                        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}).json()
    shorthand = _create(client, model="tiny-lm", training_file=chat_file, hyperparameters={"n_epochs": 2}).json()
    for job in (by_method, shorthand):
        assert job["method"]["type"] == "supervised" and job["config"]["method"] == "supervised"
        assert job["method"]["supervised"]["hyperparameters"]["n_epochs"] == 2
        assert "beta" not in job["hyperparameters"]


@pytest.mark.parametrize(("file", "body", "param", "code"), [
    ("pref", {"method": {"type": "reinforcement", "reinforcement": {}}}, "method.type", "unsupported_method"),
    ("chat", {"method": {"type": "dpo"}}, "training_file", "invalid_file_format"),
    ("pref", {}, "training_file", "invalid_file_format"),  # preference data needs method dpo
    ("pref", {"method": {"type": "supervised"}}, "training_file", "invalid_file_format"),
    ("pref", {"method": {"type": "dpo", "supervised": {}}}, "method.supervised", None),
    ("pref", {"method": {"type": "dpo"}, "hyperparameters": {"n_epochs": 1}}, "hyperparameters", None),
    ("pref", {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}},
     "method.dpo.hyperparameters.beta", None),
    ("pref", {"method": {"type": "dpo"}, "packing": True}, "method", None),
    ("pref", {"method": {"type": "ppo"}}, "method.type", None),
])
def test_method_errors_are_clear_400s(client: TestClient, pref_file: str, chat_file: str, file: str,
                                      body: dict[str, Any], param: str, code: str | None) -> None:
    r = _create(client, model="tiny-lm", training_file=pref_file if file == "pref" else chat_file, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert code is None or err["code"] == code
    assert "not supported" in err["message"] or code != "unsupported_method"


def test_dpo_needs_a_decoder_causal_lm(client: TestClient, pref_file: str) -> None:
    r = _create(client, model="tiny-lm", training_file=pref_file, task="classification", method={"type": "dpo"})
    assert r.status_code == 400 and r.json()["error"]["param"] in ("method", "training_file"), r.text


def test_openai_sdk_creates_a_dpo_job(client: TestClient, tmp_path: Path) -> None:
    oai = openai.OpenAI(api_key=client.api_key, base_url="http://testserver/v1",  # type: ignore[attr-defined]
                        http_client=client, max_retries=0)
    rows = ds.preference_rows(10)
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(path, "rb") as fh:
        uploaded = oai.files.create(file=fh, purpose="fine-tune")
    assert uploaded.model_extra is not None and uploaded.model_extra["format"] == "preference"
    job = oai.fine_tuning.jobs.create(
        model="tiny-lm", training_file=uploaded.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2, "batch_size": 4}}})
    assert job.method is not None and job.method.type == "dpo" and job.method.dpo is not None
    hp = job.method.dpo.hyperparameters
    assert hp is not None and (hp.beta, hp.n_epochs, hp.batch_size) == (0.2, 2, 4)
    assert oai.fine_tuning.jobs.retrieve(job.id).method == job.method
    events = [e.message for e in oai.fine_tuning.jobs.list_events(job.id, limit=20)]
    assert any(f"in {2 * math.ceil(10 / 4)} steps" in m for m in events), events  # the estimate counts pairs
    with pytest.raises(openai.BadRequestError) as exc:
        oai.fine_tuning.jobs.create(model="tiny-lm", training_file=uploaded.id,
                                    method={"type": "reinforcement"})
    assert exc.value.code == "unsupported_method" and exc.value.param == "method.type"


def test_dpo_estimate_counts_pairs(client: TestClient) -> None:
    """POST /estimate sees a DPO job as it trains: steps over pairs, tokens of both answers."""
    body_rows = "".join(json.dumps(r) + "\n" for r in ds.preference_rows(12)).encode()
    up = client.post("/v1/files", files={"file": ("p.jsonl", body_rows)}, data={"purpose": "fine-tune"})
    assert up.status_code == 200, up.text
    body = {"model": "tiny-lm", "training_file": up.json()["id"],
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}}}
    r = client.post("/v1/fine_tuning/estimate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["steps"] == math.ceil(12 / 4) and out["train_tokens"] > 0, out
