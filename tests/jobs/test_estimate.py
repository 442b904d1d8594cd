"""POST /v1/fine_tuning/estimate and the estimate made at job creation."""

from __future__ import annotations

import filecmp
import json
import math
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from app.jobs import estimate as E
from app.jobs import eta
from app.kit import ids
from app.kit.db import get_engine, utcnow
from app.models_registry.catalog import get_spec, load_catalog, local_base
from app.orm import File, Job, JobEvent, Project
from ml.config import Task
from ml.data.formats import normalize
from ml.modeling import load_tokenizer
from ml.models.builtin import build
from ml.models.tokenizer_dir import tokenizer_dir
from ml.training.data import token_lengths
from tests.conftest import USING_PG
from tests.e2e.data import chat_rows
from tests.jobs.realdb import committed_clients
from tests.ml.training import datasets as ds


@pytest.fixture(autouse=True)
def _steady_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's load changes between two estimates of a test: pin it (test_load_factor checks it)."""
    monkeypatch.setattr(E.os, "getloadavg", lambda: (E.eta.TABLE_LOAD_PER_CORE * (E.os.cpu_count() or 1),) * 3)


def _upload(client: TestClient, rows: list[dict[str, Any]], name: str = "t.jsonl") -> str:
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    r = client.post("/v1/files", files={"file": (name, body)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def _exact_tokens(rows: list[dict[str, Any]], task: Task, max_len: int, model: str = "tiny-lm") -> list[int]:
    """As the trainer counts: its own tokenizer loader (AutoTokenizer, torch is fine here)."""
    decoder = model == "tiny-lm"
    tok = load_tokenizer(local_base(model).path)
    return token_lengths([normalize(r)[1] for r in rows], task, tok, max_len, decoder)


def test_estimate_counts_tokens_like_the_trainer(client: TestClient, db: Session) -> None:
    rows, valid = chat_rows(30), chat_rows(10, seed=1)
    body = {"model": "tiny-lm", "training_file": _upload(client, rows), "max_seq_length": 64,
            "validation_file": _upload(client, valid), "hyperparameters": {"n_epochs": 3, "batch_size": 4}}
    r = client.post("/v1/fine_tuning/estimate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    lengths = _exact_tokens(rows, Task.causal_lm, 64)
    assert out["object"] == "fine_tuning.estimate"
    assert out["train_tokens"] == sum(lengths) and out["examples"] == len(lengths) == 30
    assert out["validation_tokens"] == sum(_exact_tokens(valid, Task.causal_lm, 64))
    assert max(lengths) == 64  # truncated at max_seq_length
    assert (out["n_epochs"], out["batch_size"], out["steps"]) == (3, 4, 3 * math.ceil(30 / 4))
    assert out["trained_tokens"] == 3 * out["train_tokens"]
    assert out["basis"] == "default" and out["sampled"] is False
    tps = E.default_tokens_per_second("tiny-lm", E.TrainingKind.lora) * out["counts"]["speedup"]
    assert out["tokens_per_second"] == pytest.approx(tps, abs=0.1)
    b = out["breakdown"]  # every phase of the job, and they add up
    assert b["train"] == pytest.approx(out["trained_tokens"] / tps + out["steps"] * eta.STEP_OVERHEAD_SECONDS, abs=0.1)
    assert out["counts"]["evaluations"] == 3 and out["counts"]["checkpoints"] == 3  # once per epoch
    assert b["evaluations"] >= 0 and b["checkpoints"] > 0 and b["report"] > 0 and b["final"] > 0
    assert b["queue"] == out["queue_seconds"] == pytest.approx(eta.DISPATCH_SECONDS)  # nothing ahead
    phases = ("setup", "train", "evaluations", "checkpoints", "report", "final")
    assert out["run_seconds"] == pytest.approx(sum(b[k] for k in phases), abs=0.5)
    assert out["estimated_seconds"] == pytest.approx(out["queue_seconds"] + out["run_seconds"], abs=0.2)
    cached = db.get(File, body["training_file"]).stats["token_counts"]  # type: ignore[union-attr]
    assert cached["causal_lm/tiny-lm/64"]["tokens"] == out["train_tokens"]
    body["max_seq_length"] = 16  # the answers start later: nothing left to learn from
    r = client.post("/v1/fine_tuning/estimate", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_seq_length", r.text


def test_estimate_classification_on_encoder(client: TestClient) -> None:
    rows = ds.sentiment_rows(40)
    body = {"model": "minilm-l6", "training_file": _upload(client, rows), "task": "classification",
            "training_type": "full", "hyperparameters": {"n_epochs": 2, "batch_size": 8}}
    out = client.post("/v1/fine_tuning/estimate", json=body).json()
    lengths = _exact_tokens(rows, Task.classification, 256, "minilm-l6")
    assert out["train_tokens"] == sum(lengths) and out["steps"] == 10 and out["training_type"] == "full"


@pytest.mark.parametrize(("extra", "status", "param"), [
    ({"model": "nope"}, 404, "model"),
    ({"training_file": "file-missing"}, 404, "training_file"),
    ({"early_stopping": {"patience": 2}}, 400, "early_stopping"),
    ({"max_seq_length": 100000}, 400, "max_seq_length"),
    ({"task": "classification"}, 400, "training_file"),
])
def test_estimate_validates_like_create(client: TestClient, extra: dict[str, Any], status: int,
                                        param: str) -> None:
    body = {"model": "tiny-lm", "training_file": _upload(client, chat_rows(5)), **extra}
    for path in ("/v1/fine_tuning/estimate", "/v1/fine_tuning/jobs"):
        r = client.post(path, json=body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (path, r.text)


def _succeeded_job(db: Session, project: Project, file_id: str, kind: str, speeds: list[float]) -> None:
    job = Job(id=ids.job_id(), project_id=project.id, model="tiny-lm", training_file=file_id, seed=1,
              task="causal_lm", training_type={"type": kind}, hyperparameters={}, config={},
              status="succeeded", finished_at=utcnow())
    db.add(job)
    db.flush()
    for i, tps in enumerate(speeds):
        db.add(JobEvent(id=ids.event_id(), job_id=job.id, type="metrics", message="m",
                        data={"step": i + 1, "train_loss": 1.0, "tokens_per_second": tps}))
    db.add(JobEvent(id=ids.event_id(), job_id=job.id, type="metrics", message="e", data={"valid_loss": 1.0}))
    db.flush()


def test_measured_speed_from_past_jobs(project_client: tuple[TestClient, Project], db: Session) -> None:
    client, project = project_client
    file_id = _upload(client, chat_rows(8))
    _succeeded_job(db, project, file_id, "lora", [1000.0, 3000.0])
    _succeeded_job(db, project, file_id, "lora", [2000.0])
    _succeeded_job(db, project, file_id, "full", [99999.0])  # another training type: ignored
    db.commit()
    out = client.post("/v1/fine_tuning/estimate", json={"model": "tiny-lm", "training_file": file_id}).json()
    assert out["basis"] == "measured" and out["tokens_per_second"] == pytest.approx(2000.0)


def test_big_files_are_sampled(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = chat_rows(400)
    file_id = _upload(client, rows)
    monkeypatch.setattr(E, "FULL_COUNT_ROWS", 50)
    out = client.post("/v1/fine_tuning/estimate", json={"model": "tiny-lm", "training_file": file_id,
                                                         "max_seq_length": 64}).json()
    exact = sum(_exact_tokens(rows, Task.causal_lm, 64))
    assert out["sampled"] is True and out["examples"] == 400
    assert out["train_tokens"] == pytest.approx(exact, rel=0.05)


def test_sample_rows_are_spread_over_the_file(tmp_path: Any) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(1000)))
    got = [int(r["text"].split()[1]) for r in E._sample_jsonl(path, 10)]
    assert len(got) == 10 and got[0] == 0 and got[-1] > 850 and got == sorted(got)


def test_create_job_sets_estimated_finish(client: TestClient, db: Session) -> None:
    file_id = _upload(client, chat_rows(20))
    before = utcnow()
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-lm", "training_file": file_id,
                                                   "hyperparameters": {"n_epochs": 2, "batch_size": 4}})
    assert r.status_code == 200, r.text
    job = r.json()
    body = {"model": "tiny-lm", "training_file": file_id, "hyperparameters": {"n_epochs": 2, "batch_size": 4}}
    est = client.post("/v1/fine_tuning/estimate", json=body).json()
    finish = before + timedelta(seconds=eta.DISPATCH_SECONDS + est["run_seconds"])  # nothing was ahead of it
    assert abs(job["estimated_finish"] - finish.timestamp()) < 5
    # The queued job is ahead of the next one: its wait runs until that job's estimated finish.
    wait = job["estimated_finish"] - utcnow().timestamp() + eta.DISPATCH_SECONDS
    assert est["queue_seconds"] == pytest.approx(wait, abs=5) and est["breakdown"]["queue"] == est["queue_seconds"]
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    (event,) = [e for e in events if e["message"].startswith("Estimated")]
    assert event["data"]["estimate"]["trained_tokens"] == est["trained_tokens"]


def test_create_job_without_stored_bytes_still_works(client: TestClient, db: Session,
                                                     project_client: tuple[TestClient, Project]) -> None:
    from tests.jobs.factories import make_file

    f = make_file(db, project_client[1], "chat", rows=40)  # its storage key points at nothing
    db.commit()
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-lm", "training_file": f.id})
    assert r.status_code == 200 and r.json()["estimated_finish"] is None
    assert client.post("/v1/fine_tuning/estimate", json={"model": "tiny-lm", "training_file": f.id}
                       ).status_code == 404


# --- the tokenizer: the trainer's, without torch, one per thread -----------------------------------

@pytest.mark.parametrize("model", sorted(load_catalog()))
def test_estimate_tokenizer_is_the_trainers(model: str) -> None:
    ours, trainers = E.base_tokenizer(model), load_tokenizer(local_base(model).path)
    assert type(ours) is type(trainers)
    assert (ours.eos_token_id, ours.pad_token_id, ours.chat_template) == \
        (trainers.eos_token_id, trainers.pad_token_id, trainers.chat_template)
    decoder = get_spec(model).is_decoder
    for rows, task in [(ds.sentiment_rows(30), Task.classification), (ds.sentiment_rows(30), Task.masked_lm),
                       (chat_rows(20), Task.causal_lm), (ds.prompt_completion_rows(10), Task.causal_lm)]:
        if task.value not in get_spec(model).tasks:
            continue
        records = [normalize(r)[1] for r in rows]
        for max_len in (16, 64):
            assert token_lengths(records, task, ours, max_len, decoder) == \
                token_lengths(records, task, trainers, max_len, decoder)


def test_builtin_tokenizer_alone_matches_the_full_build(tmp_path: Path) -> None:
    alone = tokenizer_dir(get_spec("tiny-lm"), tmp_path)  # nothing built yet: the tokenizer only
    assert alone.name == "tiny-lm.tokenizer" and not (alone / "config.json").exists()
    build("tiny-causal-lm", tmp_path / "full")
    names = sorted(p.name for p in alone.iterdir())
    assert names and all(filecmp.cmp(alone / n, tmp_path / "full" / n, shallow=False) for n in names)


def test_each_thread_has_its_own_tokenizer() -> None:
    mine = E.base_tokenizer("tiny-lm")
    assert E.base_tokenizer("tiny-lm") is mine
    theirs: list[Any] = []
    worker = threading.Thread(target=lambda: theirs.append(E.base_tokenizer("tiny-lm")))
    worker.start()
    worker.join()
    assert theirs[0] is not mine


def test_create_job_rejects_nothing_to_learn(client: TestClient) -> None:
    body = {"model": "tiny-lm", "training_file": _upload(client, chat_rows(10)), "max_seq_length": 16}
    r = client.post("/v1/fine_tuning/jobs", json=body)  # the answers start after 16 tokens
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_seq_length", r.text
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


@pytest.mark.skipif(not USING_PG, reason="inspects Postgres sessions and row locks")
@pytest.mark.parametrize("path", ["/v1/fine_tuning/jobs", "/v1/fine_tuning/estimate"])
def test_tokenizing_holds_no_transaction(committed_db: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch,
                                         path: str) -> None:
    """While the files are tokenized, no session of the app is idle in a transaction and the training
    file's row can be locked by anyone (job creation used to hold FOR SHARE while tokenizing)."""
    (client,) = committed_clients(committed_db, "estimate-tx")
    file_id = _upload(client, chat_rows(12))
    seen: list[tuple[int, bool]] = []
    real = E.count_file_tokens

    def observed(*args: Any, **kwargs: Any) -> E.TokenCount:
        with get_engine().connect() as conn:
            idle = conn.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                    "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"))
            locked = conn.execute(text("SELECT id FROM files WHERE id = :id FOR UPDATE NOWAIT"),
                                  {"id": file_id}).first() is not None
            conn.rollback()
        seen.append((int(idle or 0), locked))
        return real(*args, **kwargs)

    monkeypatch.setattr(E, "count_file_tokens", observed)
    r = client.post(path, json={"model": "tiny-lm", "training_file": file_id, "max_seq_length": 64})
    assert r.status_code == 200, r.text
    assert seen == [(0, True)]


def test_load_factor_in_embedded_mode_only(monkeypatch: pytest.MonkeyPatch) -> None:
    cores = E.os.cpu_count() or 1
    monkeypatch.setattr(E.os, "getloadavg", lambda: (2 * E.eta.TABLE_LOAD_PER_CORE * cores + 1,) * 3)
    assert E.host_load_factor(True, "cpu") == pytest.approx(0.5 ** E.eta.LOAD_EXPONENT)  # twice the table's load
    assert E.host_load_factor(False, "cpu") == 1.0  # the API's host is not the workers'
    assert E.host_load_factor(True, "cuda") == 1.0
