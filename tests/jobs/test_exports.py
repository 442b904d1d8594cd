"""Merged-weights exports (`app.jobs.exports`) without training: a fake LoRA final model in storage,
the build replaced by a stub. The real merge is tested in test_download.py. Also: the API process
(estimate, job creation, a merged download) never imports torch."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.jobs import exports
from app.kit.storage import get_storage
from app.orm import Export
from ml.checkpoint import ADAPTER_WEIGHTS, INFO_FILE
from tests.conftest import USING_PG
from tests.jobs.export_fakes import fake_build, fake_lora_final
from tests.jobs.realdb import committed_clients

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Export ids whose build task was sent (after commit)."""
    out: list[str] = []
    monkeypatch.setattr(exports, "send_build", out.append)
    return out


@pytest.fixture
def lora(committed_db: sessionmaker[Session]) -> tuple[TestClient, str]:
    (client,) = committed_clients(committed_db, "exports-a")
    with committed_db() as s:
        return client, fake_lora_final(s, "exports-a")


def _url(job_id: str) -> str:
    return f"/v1/fine_tuning/jobs/{job_id}/checkpoints/final/download"


def test_ready_export_streams_and_duplicates_are_harmless(lora: tuple[TestClient, str], sent: list[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    client, job_id = lora
    monkeypatch.setattr(exports, "_build", fake_build)
    r = client.get(_url(job_id), params={"format": "merged"})
    assert r.status_code == 202 and r.headers["retry-after"] == str(exports.RETRY_AFTER_SECONDS)
    export = r.json()
    assert export["object"] == "fine_tuning.export" and export["status"] == "queued" and sent == [export["id"]]
    assert client.get(_url(job_id), params={"format": "full"}).json()["id"] == export["id"]  # one build
    assert sent == [export["id"]]
    assert [exports.build_export(export["id"]) for _ in range(2)] == ["ready", "skipped"]
    r = client.get(_url(job_id), params={"format": "full"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        names = set(tar.getnames())
        info = json.loads(tar.extractfile(f"{job_id}-final-full/{INFO_FILE}").read())  # type: ignore[union-attr]
    assert f"{job_id}-final-full/model.safetensors" in names
    assert info["export"]["merged"] is True and info["export"]["format"] == "full"
    assert sent == [export["id"]]


def test_changed_checkpoint_is_rebuilt(lora: tuple[TestClient, str], sent: list[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    client, job_id = lora
    monkeypatch.setattr(exports, "_build", fake_build)
    export_id = client.get(_url(job_id), params={"format": "merged"}).json()["id"]
    assert exports.build_export(export_id) == "ready"
    (get_storage().local_dir(f"jobs/{job_id}/final") / ADAPTER_WEIGHTS).write_bytes(b"adapter v2")
    r = client.get(_url(job_id), params={"format": "merged"})
    assert r.status_code == 202 and r.json()["status"] == "queued" and sent == [export_id, export_id]


def test_failed_export_answers_an_error_then_retries(lora: tuple[TestClient, str], sent: list[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    client, job_id = lora

    def broken(storage: Any, claim: exports.Claim) -> tuple[str, str]:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(exports, "_build", broken)
    export_id = client.get(_url(job_id), params={"format": "merged"}).json()["id"]
    assert exports.build_export(export_id) == "failed"
    r = client.get(_url(job_id), params={"format": "merged"})
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "export_failed" and err["type"] == "server_error" and "disk" not in err["message"]
    monkeypatch.setitem(exports.REQUEUE_AFTER, "failed", timedelta(0))
    r = client.get(_url(job_id), params={"format": "merged"})
    assert r.status_code == 202 and r.json()["status"] == "queued" and sent == [export_id, export_id]


def test_a_stale_claim_cannot_record(lora: tuple[TestClient, str], sent: list[str],
                                     committed_db: sessionmaker[Session]) -> None:
    client, job_id = lora
    export_id = client.get(_url(job_id), params={"format": "merged"}).json()["id"]
    first = exports._claim(export_id)
    assert first is not None and exports._claim(export_id) is None  # building: not claimable
    with committed_db() as s:  # re-queued meanwhile (its worker looked dead), claimed again
        row = s.get(Export, export_id)
        assert row is not None
        row.status = "queued"
        s.commit()
    second = exports._claim(export_id)
    assert second is not None and second.attempt == first.attempt + 1
    assert not exports._finish(first, status="ready", storage_key="x")
    assert exports._finish(second, status="failed", error={"message": "m"})


@pytest.mark.skipif(not USING_PG, reason="concurrent writers need Postgres")
def test_concurrent_requests_enqueue_one_build(lora: tuple[TestClient, str], sent: list[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    client, job_id = lora
    barrier, local = threading.Barrier(2, timeout=30), threading.local()
    real_find: Callable[..., Export | None] = exports._find

    def racing_find(*args: Any) -> Export | None:
        row = real_find(*args)
        if not getattr(local, "raced", False):  # both requests look before either inserts
            local.raced = True
            barrier.wait()
        return row

    monkeypatch.setattr(exports, "_find", racing_find)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: client.get(_url(job_id), params={"format": "merged"}), range(2)))
    assert [r.status_code for r in answers] == [202, 202], [r.text for r in answers]
    assert answers[0].json()["id"] == answers[1].json()["id"] and sent == [answers[0].json()["id"]]


# --- the API process never imports torch ------------------------------------------------------------

API_SCRIPT = """
import json, sys
from fastapi.testclient import TestClient
from app.auth.service import create_api_key, get_or_create_project
from app.kit.db import get_sessionmaker
from app.main import create_app
from tests.jobs.export_fakes import fake_lora_final

with get_sessionmaker()() as s:
    key = create_api_key(s, get_or_create_project(s, "no-torch"), "t")
    s.commit()
    lora_job = fake_lora_final(s, "no-torch")
client = TestClient(create_app(), headers={"Authorization": f"Bearer {key}"})
chat = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}
body = "".join(json.dumps(chat) + "\\n" for _ in range(8)).encode()
file_id = client.post("/v1/files", files={"file": ("t.jsonl", body)}, data={"purpose": "fine-tune"}).json()["id"]
job = {"model": "tiny-lm", "training_file": file_id, "max_seq_length": 64}
codes = [client.post("/v1/fine_tuning/estimate", json=job).status_code,
         client.post("/v1/fine_tuning/jobs", json=job).status_code,
         client.get(f"/v1/fine_tuning/jobs/{lora_job}/checkpoints/final/download?format=merged").status_code]
print(json.dumps({"codes": codes, "torch": "torch" in sys.modules}))
"""


def test_the_api_process_never_imports_torch(committed_db: sessionmaker[Session]) -> None:
    """Estimate, job creation and a merged download in a fresh interpreter, on the test database."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", API_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"codes": [200, 200, 202], "torch": False}, proc.stderr[-3000:]
