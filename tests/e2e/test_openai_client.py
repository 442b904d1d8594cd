"""The official openai client against a live server on Postgres: files and jobs round trip."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.e2e.data import chat_rows, write_jsonl


def test_openai_client_files_and_jobs(live_server: str, api_key: str, tmp_path: Path) -> None:
    client = openai.OpenAI(base_url=f"{live_server}/v1", api_key=api_key, max_retries=0)
    path = write_jsonl(tmp_path / "train.jsonl", chat_rows(30))
    with open(path, "rb") as fh:
        f = client.files.create(file=fh, purpose="fine-tune")
    assert f.id.startswith("file-") and f.status == "processed" and f.bytes == path.stat().st_size
    assert client.files.retrieve(f.id).filename == "train.jsonl"
    assert client.files.content(f.id).read() == path.read_bytes()
    assert f.id in [x.id for x in client.files.list()]

    job = client.fine_tuning.jobs.create(model="tiny-lm", training_file=f.id, suffix="geo",
                                         hyperparameters={"n_epochs": 1},
                                         extra_body={"training_type": {"type": "lora", "lora_r": 4}})
    assert job.status == "queued" and job.hyperparameters.n_epochs == 1
    assert next(j.id for j in client.fine_tuning.jobs.list(limit=5)) == job.id
    assert client.fine_tuning.jobs.retrieve(job.id).training_file == f.id
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=50))
    assert any("cancelled" in e.message for e in events)
    assert list(client.fine_tuning.jobs.checkpoints.list(job.id)) == []

    with pytest.raises(openai.NotFoundError) as err:
        client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
    assert err.value.body["param"] == "fine_tuning_job_id"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        client.fine_tuning.jobs.create(model="tiny-lm", training_file=f.id, hyperparameters={"n_epochs": 99})
    assert bad.value.body["param"] == "hyperparameters.n_epochs"  # type: ignore[index]
    client.files.delete(f.id)
