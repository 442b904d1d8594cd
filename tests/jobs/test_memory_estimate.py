"""Memory and speed options at the API: the estimate's predicted peak and whether it fits the workers'
devices, the 400 for a job that clearly cannot fit, steps counted in packed rows, shape checks of the
new fields, and (slow, a real worker) a QLoRA job failing clearly on a CPU worker and a packed job
training exactly the estimated steps."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.models_registry.catalog import local_base
from app.settings import get_settings
from ml import memory
from ml.config import Task, TrainingKind
from ml.data.formats import normalize
from ml.data.packing import pack_rows
from ml.modeling import load_tokenizer
from ml.training.data import token_lengths
from tests.e2e.data import chat_rows
from tests.jobs.realdb import committed_clients, job_body, upload
from tests.ml.training import datasets as ds

ESTIMATE, JOBS = "/v1/fine_tuning/estimate", "/v1/fine_tuning/jobs"


def _upload(client: TestClient, rows: list[dict[str, Any]], name: str = "t.jsonl") -> str:
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    r = client.post("/v1/files", files={"file": (name, body)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def _lengths(rows: list[dict[str, Any]], max_len: int) -> list[int]:
    tok = load_tokenizer(local_base("tiny-lm").path)  # builds tiny-lm: its config.json is what the estimate reads
    return token_lengths([normalize(r)[1] for r in rows], Task.causal_lm, tok, max_len, True)


@pytest.fixture
def body(client: TestClient) -> dict[str, Any]:
    local_base("tiny-lm")
    return {"model": "tiny-lm", "training_file": _upload(client, chat_rows(30)), "max_seq_length": 64,
            "hyperparameters": {"n_epochs": 2, "batch_size": 16}, "training_type": "full"}


def test_estimate_predicts_peak_memory(client: TestClient, body: dict[str, Any],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    mem = client.post(ESTIMATE, json=body).json()["memory"]
    parts = ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes")
    assert mem["peak_bytes"] == sum(mem[k] for k in parts) and all(mem[k] > 0 for k in parts)
    assert (mem["device_bytes"], mem["fits"], mem["gradient_checkpointing"]) == (None, None, False)
    shape = memory.shape_from_dir(local_base("tiny-lm").path)
    assert shape is not None
    assert mem["weights_bytes"] == 4 * shape.params and mem["optimizer_bytes"] == 2 * mem["gradients_bytes"]
    # the longest example, not max_seq_length, sizes the activations
    longest = max(_lengths(chat_rows(30), 64))
    work = memory.Workload(Task.causal_lm, TrainingKind.full, rows=16, seq_len=longest, precision="bf16",
                           device="cuda")
    assert mem["activations_bytes"] == memory.estimate(shape, work).activations_bytes
    monkeypatch.setattr(get_settings(), "worker_device_memory_bytes", 80 << 30)
    assert client.post(ESTIMATE, json=body).json()["memory"]["fits"] is True


def test_a_job_that_cannot_fit_is_refused_with_the_numbers(client: TestClient, body: dict[str, Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    plain = client.post(ESTIMATE, json={**body, "gradient_checkpointing": False}).json()["memory"]
    ckpt = client.post(ESTIMATE, json={**body, "gradient_checkpointing": True}).json()["memory"]
    assert ckpt["gradient_checkpointing"] and ckpt["activations_bytes"] < plain["activations_bytes"]
    # between the two peaks: "auto" (the default) turns checkpointing on, and the job fits
    between = int((plain["peak_bytes"] + ckpt["peak_bytes"]) / 2 / memory.HEADROOM)
    monkeypatch.setattr(get_settings(), "worker_device_memory_bytes", between)
    auto = client.post(ESTIMATE, json=body).json()["memory"]
    assert auto["gradient_checkpointing"] is True and auto["fits"] is True
    assert client.post(JOBS, json=body).status_code == 200
    # below even the checkpointed peak: the estimate says so, creation refuses with the numbers
    monkeypatch.setattr(get_settings(), "worker_device_memory_bytes", ckpt["peak_bytes"] - 1)
    assert client.post(ESTIMATE, json=body).json()["memory"]["fits"] is False
    r = client.post(JOBS, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == ("batch_size", "insufficient_memory")
    assert "GiB of device memory at its peak" in err["message"] and "gradient checkpointing on" in err["message"]


def test_estimate_counts_packed_rows(client: TestClient, body: dict[str, Any]) -> None:
    body = {**body, "packing": True, "max_seq_length": 128, "training_type": "lora",
            "hyperparameters": {"n_epochs": 3, "batch_size": 2}, "gradient_accumulation_steps": 2}
    out = client.post(ESTIMATE, json=body).json()
    rows = len(pack_rows(_lengths(chat_rows(30), 128), 128))
    assert out["packed_rows"] == rows < out["examples"] == 30
    assert out["steps"] == 3 * math.ceil(math.ceil(rows / 2) / 2)
    assert client.post(ESTIMATE, json={**body, "packing": False}).json()["packed_rows"] is None


@pytest.mark.parametrize(("extra", "param"), [
    ({"packing": True, "task": "classification"}, "packing"),
    ({"packing": True, "training_type": "prompt_tuning"}, "packing"),
    ({"training_type": "qlora", "task": "classification"}, "training_type"),
    ({"precision": "fp8"}, "precision"),
    ({"gradient_checkpointing": "sometimes"}, "gradient_checkpointing"),
])
def test_memory_options_are_validated(client: TestClient, extra: dict[str, Any], param: str) -> None:
    rows = ds.sentiment_rows(8) if extra.get("task") == "classification" else chat_rows(5)
    r = client.post(JOBS, json={"model": "tiny-lm", "training_file": _upload(client, rows), **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_qlora_needs_a_decoder_from_the_catalog(client: TestClient) -> None:
    r = client.post(JOBS, json={"model": "minilm-l6", "training_file": _upload(client, ds.sentiment_rows(8)),
                                "task": "classification", "training_type": "qlora"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_training_type"
    r = client.post(JOBS, json={"model": "tiny-lm", "training_file": _upload(client, chat_rows(5)),
                                "training_type": {"type": "qlora", "lora_r": 4}, "packing": True})
    assert r.status_code == 200, r.text  # the API can't see the workers' GPUs: the worker decides
    cfg = r.json()["config"]
    assert cfg["training_type"]["type"] == "qlora" and cfg["training_type"]["lora_r"] == 4
    assert (cfg["precision"], cfg["gradient_checkpointing"], cfg["packing"]) == ("auto", "auto", True)


# --- a real worker --------------------------------------------------------------------------------


@pytest.fixture
def real(committed_db: sessionmaker[Session]) -> TestClient:
    return committed_clients(committed_db, "memory")[0]


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_a_cpu_worker_fails_a_qlora_job_clearly(real: TestClient) -> None:
    from app.jobs.runner import run_job
    from ml.modeling import pick_device, qlora_unavailable

    if qlora_unavailable(pick_device(get_settings().device)) is None:
        pytest.skip("this worker can train QLoRA")
    r = real.post(JOBS, json=job_body(upload(real, chat_rows(8)), "causal_lm", "qlora", 1e-3))
    assert r.status_code == 200, r.text
    assert run_job(r.json()["id"], "w") == "failed"
    job = real.get(f"{JOBS}/{r.json()['id']}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_request"
    assert job["error"]["message"].startswith("QLoRA needs a CUDA worker with bitsandbytes; this worker has none")


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_a_packed_job_trains_the_estimated_steps(real: TestClient) -> None:
    from app.jobs.runner import run_job

    body = job_body(upload(real, chat_rows(30)), "causal_lm", "lora", 2e-2, packing=True, max_seq_length=128)
    est = real.post(ESTIMATE, json=body).json()
    created = real.post(JOBS, json=body).json()
    assert run_job(created["id"], "w") == "succeeded"
    job = real.get(f"{JOBS}/{created['id']}").json()
    assert est["packed_rows"] < est["examples"]
    assert job["progress"]["step"] == est["steps"] and job["trained_tokens"] == est["trained_tokens"]
    events = real.get(f"{JOBS}/{created['id']}/events", params={"limit": 1000}).json()["data"]
    assert any((e["data"] or {}).get("packing") is True and "memory" in e["data"] for e in events)


def test_estimate_is_per_device_and_faster_across_devices(client: TestClient, body: dict[str, Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "worker_devices", 2)
    one = client.post(ESTIMATE, json=body).json()
    ddp = client.post(ESTIMATE, json={**body, "resources": {"devices": 2}}).json()
    fsdp = client.post(ESTIMATE, json={**body, "resources": {"devices": 2, "strategy": "fsdp"}}).json()
    assert ddp["steps"] == one["steps"]  # batch_size is the global batch
    assert ddp["memory"]["activations_bytes"] == one["memory"]["activations_bytes"] // 2  # 8 of 16 rows each
    assert ddp["memory"]["optimizer_bytes"] == one["memory"]["optimizer_bytes"]  # replicas
    assert fsdp["memory"]["optimizer_bytes"] * 2 == one["memory"]["optimizer_bytes"]  # shards
    assert ddp["breakdown"]["train"] < one["breakdown"]["train"]
