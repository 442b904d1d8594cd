"""A DPO job created with the openai client's `method` runs on a real Celery worker to success: metrics
events and the result CSV carry the reward stats, the report compares reference and tuned, and the
model is served."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.conftest import Proc, wait_for
from tests.ml.training.datasets import preference_rows, write_jsonl

pytestmark = pytest.mark.slow


def _upload(client: openai.OpenAI, path: Path) -> str:
    with open(path, "rb") as fh:
        return client.files.create(file=fh, purpose="fine-tune").id


def test_dpo_job_succeeds_and_is_served(live_server: str, api_key: str, tmp_path: Path,
                                        start_worker: Callable[..., Proc]) -> None:
    client = openai.OpenAI(base_url=f"{live_server}/v1", api_key=api_key, max_retries=0)
    rows = preference_rows(24)
    train = _upload(client, write_jsonl(tmp_path / "train.jsonl", rows))
    valid = _upload(client, write_jsonl(tmp_path / "valid.jsonl", rows[:8]))
    job = client.fine_tuning.jobs.create(
        model="tiny-lm", training_file=train, validation_file=valid, seed=3,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 4, "batch_size": 4}}},
        extra_body={"training_type": {"type": "lora"}, "learning_rate": 3e-2, "max_seq_length": 64})
    worker = start_worker()
    done: Any = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status
                         in ("succeeded", "failed") and j, 240, "DPO job to finish")
    assert done.status == "succeeded", (done.error, worker.tail())
    assert done.method is not None and done.method.type == "dpo"
    report = done.model_extra["evaluation"]
    base, tuned = report["metrics"]["base"], report["metrics"]["fine_tuned"]
    print(f"\nDPO e2e: reward_accuracy {base['reward_accuracy']} -> {tuned['reward_accuracy']}, "
          f"valid_loss {base['valid_loss']:.3f} -> {tuned['valid_loss']:.3f}")
    assert report["method"] == "dpo" and tuned["reward_accuracy"] >= 0.875 and tuned["valid_loss"] < base["valid_loss"]
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=1000))
    assert any(e.type == "metrics" and e.data and "reward_margin" in e.data for e in events)
    header = client.files.content(done.result_files[0]).text.splitlines()[0].split(",")
    assert {"reward_accuracy", "chosen_reward", "rejected_reward", "reward_margin"} <= set(header)
    reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "What color is the sky?"}])
    assert reply.choices[0].message.content is not None
