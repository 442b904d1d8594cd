"""Weights download: jobs trained for real (app.jobs.runner.run_job on the committed database), each
format downloaded over HTTP, extracted, loaded with plain transformers / peft and compared with
the checkpoint loaded with peft onto its base and with /v1/predictions. A LoRA's merged
model answers 202 until the worker's export task (`app.jobs.exports.build_export`, run here in-process)
has built it."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from sqlalchemy.orm import Session, sessionmaker
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from app.inference.local import LocalInference, make_engine
from app.jobs import exports
from app.kit.db import get_sessionmaker
from app.kit.storage import get_storage
from app.models_registry.catalog import base_model_path, get_spec
from app.orm import FineTunedModel
from app.settings import get_settings
from ml.checkpoint import is_adapter_dir, read_info
from ml.modeling import load_adapter, load_task_model, load_tokenizer
from tests.jobs.realdb import committed_clients, train
from tests.ml.training import datasets as ds

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
TEXTS = ["The movie was great. I loved it.", "An awful phone. Never again.",
         "Really superb. Worth every penny."]
WEIGHT_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".ckpt"}


@pytest.fixture
def clients(committed_db: sessionmaker[Session]) -> Iterator[tuple[TestClient, TestClient]]:
    """Two projects on an app bound to the committed database (the worker runs in this process), its
    inference served by an engine in this process as an inference worker would."""
    a, b = committed_clients(committed_db, "dl-a", "dl-b")
    engine = make_engine(get_settings())
    a.app.state.inference = LocalInference(engine, 120)  # type: ignore[attr-defined]
    yield a, b
    engine.close()


def download(client: TestClient, job_id: str, ckpt: str, fmt: str | None, dest: Path,
             built: bool = False) -> Path:
    """`built`: expect a 202 first, then build the export as the worker would and ask again."""
    params = {"format": fmt} if fmt else {}
    url = f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{ckpt}/download"
    r = client.get(url, params=params)
    if built:
        assert r.status_code == 202 and r.headers["retry-after"], r.text
        export = r.json()
        assert export["object"] == "fine_tuning.export" and export["status"] == "queued"
        assert (export["format"], export["fine_tuning_job_id"], export["checkpoint"]) == (fmt, job_id, ckpt)
        assert client.get(url, params=params).json()["id"] == export["id"]  # one export, still queued
        assert exports.build_export(export["id"]) == "ready"
        assert exports.build_export(export["id"]) == "skipped"  # a duplicate delivery
        r = client.get(url, params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-tar"
    assert int(r.headers["content-length"]) == len(r.content)
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        names = tar.getnames()
        tar.extractall(dest, filter="data")
    assert not any("training_state" in n for n in names), names
    assert not any(Path(n).suffix in WEIGHT_SUFFIXES for n in names), names  # safetensors only
    (root,) = {n.split("/", 1)[0] for n in names}
    exported = json.loads((dest / root / "tunehouse.json").read_text())["export"]["format"]
    assert root == f"{job_id}-{ckpt}-{exported}" and exported == (fmt or exported)
    return dest / root


def _ids(tok: Any, text: str) -> torch.Tensor:
    ids = tok(text)["input_ids"] + [tok.eos_token_id]  # decoder classification: as trained, eos last
    return torch.tensor([ids])


def _cls_logits(model: torch.nn.Module, tok: Any) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.eval()(input_ids=_ids(tok, t)).logits for t in TEXTS])


def _final_key(job: dict[str, Any]) -> str:
    with get_sessionmaker()() as s:
        row = s.get(FineTunedModel, job["fine_tuned_model"])
        assert row is not None
        return row.storage_key


def _reference(job: dict[str, Any], ckpt_key: str) -> tuple[torch.nn.Module, Any]:
    """The checkpoint as trained: an adapter on a fresh base (not merged), or the full model."""
    ckpt = get_storage().local_dir(ckpt_key)
    info, tok = read_info(ckpt), load_tokenizer(ckpt)
    if not is_adapter_dir(ckpt):
        return load_task_model(info.task, ckpt, tok, info.label_names).eval(), tok
    base = load_task_model(info.task, base_model_path(get_spec(job["model"])), tok, info.label_names)
    return load_adapter(base, ckpt, trainable=False).eval(), tok


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _checkpoints(client: TestClient, job_id: str) -> list[dict[str, Any]]:
    return list(client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"])


def _service_labels(client: TestClient, model: str) -> list[str]:
    r = client.post("/v1/predictions", json={"model": model, "input": TEXTS})
    assert r.status_code == 200, r.text
    return [p["label"] for p in r.json()["data"]]


Clients = tuple[TestClient, TestClient]


def test_lora_classification_adapter_merged_full(clients: Clients, tmp_path: Path) -> None:
    client, other = clients
    job = train(client, ds.sentiment_rows(32), "classification", "lora", 2e-2)
    ref, tok = _reference(job, _final_key(job))
    expected = _cls_logits(ref, tok)

    merged = download(client, job["id"], "final", "merged", tmp_path / "m", built=True)
    files = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tunehouse.json"} <= files
    plain = AutoModelForSequenceClassification.from_pretrained(merged)
    assert not isinstance(plain, PeftModel)
    _same(_cls_logits(plain, AutoTokenizer.from_pretrained(merged)), expected)
    assert plain.config.id2label == {0: "negative", 1: "positive"}
    info = json.loads((merged / "tunehouse.json").read_text())
    assert info["export"] == {"format": "merged", "job_id": job["id"], "checkpoint": "final", "merged": True,
                              "fine_tuned_model": job["fine_tuned_model"], "base_model": "tiny-lm"}
    assert get_storage().exists(f"jobs/{job['id']}/exports/final-merged")  # cached for the next download
    full = download(client, job["id"], "final", "full", tmp_path / "f")  # the same export: no 202
    assert (full / "model.safetensors").read_bytes() == (merged / "model.safetensors").read_bytes()

    adapter = download(client, job["id"], "final", None, tmp_path / "a")  # default: as trained
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    base = AutoModelForSequenceClassification.from_pretrained(
        base_model_path(get_spec("tiny-lm")), num_labels=2, pad_token_id=tok.pad_token_id)
    _same(_cls_logits(PeftModel.from_pretrained(base, adapter), tok), expected)

    labels = _service_labels(client, job["fine_tuned_model"])
    assert labels == [plain.config.id2label[int(i)] for i in expected.argmax(-1)]

    ckpt = _checkpoints(client, job["id"])[-1]  # the epoch-1 checkpoint (has training_state/ in storage)
    part = download(client, job["id"], ckpt["id"], "adapter", tmp_path / "c")
    assert (part / "adapter_model.safetensors").exists()
    assert other.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints/final/download").status_code == 404
    missing = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints/ftckpt-nope/download")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "checkpoint_id"


def test_full_checkpoint_downloads_whole_model(clients: Clients, tmp_path: Path) -> None:
    client, _ = clients
    job = train(client, ds.sentiment_rows(32), "classification", "full", 1e-2)
    url = f"/v1/fine_tuning/jobs/{job['id']}/checkpoints/final/download"
    r = client.get(url, params={"format": "adapter"})
    assert r.status_code == 400 and "format=full" in r.json()["error"]["message"]
    full = download(client, job["id"], "final", "full", tmp_path / "f")
    ref, tok = _reference(job, _final_key(job))
    _same(_cls_logits(AutoModelForSequenceClassification.from_pretrained(full), tok), _cls_logits(ref, tok))


def test_prompt_tuning_cannot_be_merged(clients: Clients, tmp_path: Path) -> None:
    client, _ = clients
    job = train(client, ds.sentiment_rows(32), "classification", "prompt_tuning", 0.3)
    for fmt in ("merged", "full"):
        r = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints/final/download", params={"format": fmt})
        assert r.status_code == 400 and "prompt tuning" in r.json()["error"]["message"], r.text
    adapter = download(client, job["id"], "final", "adapter", tmp_path / "a")
    ref, tok = _reference(job, _final_key(job))
    base = AutoModelForSequenceClassification.from_pretrained(
        base_model_path(get_spec("tiny-lm")), num_labels=2, pad_token_id=tok.pad_token_id)
    _same(_cls_logits(PeftModel.from_pretrained(base, adapter), tok), _cls_logits(ref, tok))


def test_lora_causal_lm_merged(clients: Clients, tmp_path: Path) -> None:
    client, _ = clients
    job = train(client, ds.chat_rows(24), "causal_lm", "lora", 2e-2)
    merged = download(client, job["id"], "final", "full", tmp_path / "m", built=True)
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    out: Any = tok.apply_chat_template([{"role": "user", "content": "What color is the sky?"}],
                                       add_generation_prompt=True, return_dict=True)
    ids = out["input_ids"]
    ref, _ = _reference(job, _final_key(job))
    with torch.no_grad():
        got, want = plain(input_ids=torch.tensor([ids])).logits, ref(input_ids=torch.tensor([ids])).logits
    _same(got, want)
