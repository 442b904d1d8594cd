"""The README's causal-LM example for real: SmolLM2-135M-Instruct fine-tuned with LoRA for a few tens
of steps through the API, a Celery worker and the inference worker, on `samples/qa_json*.jsonl`
(every answer is `{"answer": ..., "confidence": ...}`). The job's evaluation report shows the base
model never answering in that shape and the fine-tuned one always doing so, and the served model
answers a question from neither file in it.

Time: the GGUF is converted once per test session (`TUNEHOUSE_DATA_DIR` is the session's, shared by
the test, the API, the worker and the inference worker: 1.5 to 2 min on a shared 2-core CPU), then the
job takes 2.5 to 3.5 min."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from app.models_registry.catalog import local_base
from tests.e2e.conftest import Proc, wait_for

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
SAMPLES = Path(__file__).resolve().parents[2] / "samples"
TERMINAL = ("succeeded", "failed", "cancelled")
HELD_OUT = "What is the capital of Sweden?"  # in neither sample file


@pytest.fixture
def one_torch_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every process the fixtures start after this one trains / serves on one thread."""
    monkeypatch.setenv("TUNEHOUSE_TORCH_THREADS", "1")


def _upload(client: openai.OpenAI, name: str) -> str:
    with open(SAMPLES / name, "rb") as fh:
        return client.files.create(file=fh, purpose="fine-tune").id


def test_smollm2_learns_the_json_answer_shape(one_torch_thread: None, live_server: str, api_key: str,
                                              start_worker: Callable[..., Proc]) -> None:
    t0 = time.monotonic()
    local_base(MODEL)  # the one-off conversion, here rather than inside the job-create request
    converted = time.monotonic() - t0
    client = openai.OpenAI(base_url=f"{live_server}/v1", api_key=api_key, max_retries=0)
    job_id = client.fine_tuning.jobs.create(
        model=MODEL, training_file=_upload(client, "qa_json.jsonl"),
        validation_file=_upload(client, "qa_json_valid.jsonl"), seed=1,
        hyperparameters={"n_epochs": 1, "batch_size": 4},
        extra_body={"training_type": "lora", "learning_rate": 2e-3}).id  # as in the README
    worker = start_worker(TUNEHOUSE_TORCH_THREADS="1")
    job = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in TERMINAL and j, 480,
                   "the smollm2 job", every=2)
    assert job.status == "succeeded", (job.error, worker.tail())
    report = job.evaluation  # type: ignore[attr-defined]  # a tunehouse extension of the job object
    base, tuned = report["metrics"]["base"], report["metrics"]["fine_tuned"]
    print(f"\nconversion {converted:.0f}s, job {time.monotonic() - t0 - converted:.0f}s: {json.dumps(report)}")
    assert report["generated_examples"] == 16 and job.trained_tokens
    assert base["format_match"] <= 0.1 and tuned["format_match"] >= 0.8
    assert tuned["valid_loss"] < base["valid_loss"]

    reply = client.chat.completions.create(model=job.fine_tuned_model, temperature=0, max_tokens=32,
                                           messages=[{"role": "user", "content": HELD_OUT}])
    text = reply.choices[0].message.content or ""
    print(f"{HELD_OUT!r} -> {text!r}")
    assert set(json.loads(text)) == {"answer", "confidence"}
