"""Embedded mode: `tunehouse serve` with no services (SQLite, local artifacts, filesystem broker, and
the training, default-queue and inference workers it supervises) runs a real job end to end and
serves the model, while the API process itself never loads torch."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.conftest import Proc, free_port, service_env, wait_for, wait_http
from tests.e2e.data import chat_rows, write_jsonl

pytestmark = pytest.mark.slow


def test_embedded_serve_runs_a_job(tmp_path: Path) -> None:
    port = free_port()
    env = service_env(TUNEHOUSE_DATA_DIR=str(tmp_path / "data"))
    for var in ("TUNEHOUSE_DATABASE_URL", "TUNEHOUSE_BROKER_URL", "TUNEHOUSE_ARTIFACT_URL"):
        env.pop(var, None)
    server = Proc([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env, tmp_path / "serve.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=90)
        key = (tmp_path / "data" / "api_key").read_text().strip()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        with open(write_jsonl(tmp_path / "t.jsonl", chat_rows(16)), "rb") as fh:
            file_id = client.files.create(file=fh, purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(model="tiny-lm", training_file=file_id,
                                             hyperparameters={"n_epochs": 1, "batch_size": 4},
                                             extra_body={"max_seq_length": 64})
        done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status
                        in ("succeeded", "failed") and j, 240, "embedded job")
        assert done.status == "succeeded", (done.error, server.tail())
        assert (tmp_path / "data" / "tunehouse.db").exists()
        assert any((tmp_path / "data" / "artifacts" / "jobs" / job.id).iterdir())
        reply = wait_for(lambda: _chat(client, done.fine_tuned_model), 120, "the supervised inference worker")
        assert reply.choices[0].message.content is not None
        assert "libtorch" not in _modules_of(server.p.pid), "the API process imported torch"
    finally:
        server.stop()


def _chat(client: openai.OpenAI, model: str) -> Any:
    try:
        return client.chat.completions.create(model=model, max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": "hi"}])
    except openai.APIStatusError as exc:  # 503 until the inference worker has started
        if exc.status_code != 503:
            raise
        return None


def _modules_of(pid: int) -> str:
    """Shared objects the process has mapped: torch's libraries show up once it is imported."""
    maps = Path(f"/proc/{pid}/maps")
    return maps.read_text() if maps.exists() else ""
