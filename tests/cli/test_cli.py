"""`tunehouse files|jobs|models|predict|chat` against a live server."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.cli_user import parse_sse, sparkline
from app.jobs.events import add_event
from app.kit import ids
from app.orm import Checkpoint, Job
from tests.cli.conftest import Cli

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    return _jsonl(tmp_path / "train.jsonl", [CHAT] * 12)


def _upload(cli: Cli, path: Path) -> str:
    return cli("files", "upload", str(path), "--quiet").strip()


def _create_job(cli: Cli, file_id: str) -> str:
    out = cli("jobs", "create", "--model", "tiny-lm", "--training-file", file_id, "--epochs", "2",
              "--lora-r", "4", "--suffix", "demo", "--quiet")
    return out.strip().splitlines()[-1]


# --- pure helpers ---------------------------------------------------------------------------------

def test_sparkline() -> None:
    assert sparkline([]) == ""
    assert sparkline([3.0, 2.0, 1.0]) == "█▅▁"
    assert sparkline([1.0] * 5) == "▁▁▁▁▁"
    assert len(sparkline([float(i) for i in range(1000)], width=40)) == 40


def test_parse_sse() -> None:
    lines = ["id: 7", "event: metrics", 'data: {"a": 1}', "", ": keep-alive", "", "event: end",
             'data: {"status": "succeeded"}', ""]
    events = list(parse_sse(lines))
    assert [(e.event, e.id) for e in events] == [("metrics", "7"), ("end", "7")]
    assert events[0].json() == {"a": 1}


# --- files ----------------------------------------------------------------------------------------

def test_files_upload_and_list(cli: Cli, chat_file: Path) -> None:
    out = cli("files", "upload", str(chat_file))
    file_id = re.search(r"(file-\w+)", out).group(1)  # type: ignore[union-attr]
    assert "rows=12" in out and "format=chat" in out
    listing = cli("files", "list")
    assert file_id in listing and "train.jsonl" in listing


def test_files_upload_error_names_the_line(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CHAT) + "\n" + '{"messages": [}\n')
    out = cli("files", "upload", str(bad), code=1)
    assert "Error 400" in out and "invalid_file_format" in out
    assert "line 2" in out


def test_bad_api_key_and_unreachable_server(cli: Cli) -> None:
    cli.env["TUNEHOUSE_API_KEY"] = "sk-wrong"
    assert "Error 401" in cli("files", "list", code=1)
    cli.env["TUNEHOUSE_BASE_URL"] = "http://127.0.0.1:9"
    assert "Cannot reach the tunehouse server" in cli("files", "list", code=2)


def test_openai_env_fallback_with_v1_suffix(cli: Cli, chat_file: Path) -> None:
    cli.env["OPENAI_BASE_URL"] = cli.env.pop("TUNEHOUSE_BASE_URL") + "/v1"
    cli.env["OPENAI_API_KEY"] = cli.env.pop("TUNEHOUSE_API_KEY")
    assert _upload(cli, chat_file).startswith("file-")


# --- jobs -----------------------------------------------------------------------------------------

def test_jobs_create_list_get_events_cancel(cli: Cli, chat_file: Path) -> None:
    job_id = _create_job(cli, _upload(cli, chat_file))
    assert job_id.startswith("ftjob-")
    assert job_id in cli("jobs", "list")
    got = cli("jobs", "get", job_id)
    assert "queued" in got and "tiny-lm" in got and '"n_epochs": 2' in got
    raw = json.loads(cli("jobs", "get", job_id, "--json"))
    assert raw["training_type"]["lora_r"] == 4 and raw["suffix"] == "demo"
    events = cli("jobs", "events", job_id)
    assert "Created fine-tuning job" in events and "enqueued" in events
    assert "cancelled" in cli("jobs", "cancel", job_id)
    again = cli("jobs", "cancel", job_id, code=1)
    assert "Error 409" in again and "job_not_cancellable" in again


def test_jobs_create_uploads_a_local_path(cli: Cli, chat_file: Path) -> None:
    out = cli("jobs", "create", "--model", "tiny-lm", "--training-file", str(chat_file))
    assert "Uploaded" in out and "Created job ftjob-" in out


def test_jobs_create_invalid_request(cli: Cli, chat_file: Path) -> None:
    file_id = _upload(cli, chat_file)
    out = cli("jobs", "create", "--model", "no-such-model", "--training-file", file_id, code=1)
    assert "Error 4" in out and "no-such-model" in out


def _simulate_training(factory: sessionmaker[Session], job_id: str, steps: int = 6) -> None:
    """What a worker writes: running + progress, metrics events, a checkpoint, then success."""
    time.sleep(0.8)
    with factory() as s:
        s.execute(update(Job).where(Job.id == job_id).values(
            status="running", progress={"step": 0, "total_steps": steps, "epoch": 0.0, "eta_seconds": 12}))
        add_event(s, job_id, "Fine-tuning job started (attempt 1 of 3)")
        s.commit()
    for step in range(1, steps + 1):
        with factory() as s:
            add_event(s, job_id, f"Step {step}", type="metrics",
                      data={"step": step, "train_loss": 3.0 / step, "tokens_per_second": 500.0, "attempt": 1,
                            "rank0_tokens_per_second": 250.0, "reward_margin": 0.1})
            if step == steps:
                add_event(s, job_id, f"Step {step}", type="metrics", data={"step": step, "valid_loss": 0.9})
            s.execute(update(Job).where(Job.id == job_id).values(
                progress={"step": step, "total_steps": steps, "epoch": step / 3,
                          "eta_seconds": steps - step}))
            s.commit()
        time.sleep(0.1)
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.add(Checkpoint(id=ids.checkpoint_id(), job_id=job_id, project_id=job.project_id, step=steps,
                         epoch=2.0, metrics={"train_loss": 0.5, "valid_loss": 0.9}, storage_key="k",
                         fine_tuned_model_checkpoint=f"ft:tiny-lm:cli-tests:demo:{job_id}:ckpt-step-{steps}",
                         is_best=True))
        job.status, job.fine_tuned_model = "succeeded", f"ft:tiny-lm:cli-tests:demo:{job_id}"
        add_event(s, job_id, "The job has successfully completed")
        s.commit()


def test_jobs_follow_live_then_checkpoints_and_plot(cli: Cli, chat_file: Path, tmp_path: Path,
                                                    committed_db: sessionmaker[Session]) -> None:
    job_id = _create_job(cli, _upload(cli, chat_file))
    worker = threading.Thread(target=_simulate_training, args=(committed_db, job_id))
    worker.start()
    out = cli("jobs", "follow", job_id)
    worker.join()
    assert "Fine-tuning job started" in out
    assert "eval step 6: valid_loss=0.9" in out
    assert "rank0_tokens_per_second" not in out and "reward_margin" not in out  # training steps are not evals
    assert f"Job {job_id} succeeded" in out
    assert f"Fine-tuned model: ft:tiny-lm:cli-tests:demo:{job_id}" in out
    assert "step 6/6" in out
    assert "loss █" in out and "3 → 0.5" in out  # sparkline, first → last

    ckpts = cli("jobs", "checkpoints", job_id)
    assert "ckpt-step-6" in ckpts and "★" in ckpts

    png = tmp_path / "plots" / "loss.png"
    plot = cli("jobs", "plot", job_id, "--out", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "loss █" in plot and "valid" in plot


def test_follow_a_failed_job_exits_1(cli: Cli, chat_file: Path, committed_db: sessionmaker[Session]) -> None:
    job_id = _create_job(cli, _upload(cli, chat_file))
    with committed_db() as s:
        s.execute(update(Job).where(Job.id == job_id).values(
            status="failed", error={"code": "invalid_training_data", "message": "bad rows", "param": None}))
        add_event(s, job_id, "Job failed: bad rows", level="error")
        s.commit()
    out = cli("jobs", "follow", job_id, code=1)
    assert "failed" in out and "Error: bad rows" in out


def test_plot_without_metrics(cli: Cli, chat_file: Path, tmp_path: Path) -> None:
    job_id = _create_job(cli, _upload(cli, chat_file))
    assert "no loss metrics yet" in cli("jobs", "plot", job_id, "--out", str(tmp_path / "x.png"), code=1)


def test_unknown_job(cli: Cli) -> None:
    out = cli("jobs", "get", "ftjob-nope", code=1)
    assert "Error 404" in out and "ftjob-nope" in out


# --- models, predict, chat ------------------------------------------------------------------------

def test_models_list(cli: Cli) -> None:
    out = cli("models", "list")
    assert "minilm-l6" in out and "tiny-lm" in out and "base" in out


def test_predict_classification_and_regression(stub_cli: Cli,
                                               stub_requests: list[tuple[str, dict[str, Any]]]) -> None:
    out = stub_cli("predict", "ft:minilm-l6:p::clf", "a good movie", "a bad movie")
    assert stub_requests[-1] == ("predictions", {"model": "ft:minilm-l6:p::clf",
                                                 "input": ["a good movie", "a bad movie"]})
    assert re.search(r"0\s+a good movie\s+positive\s+0\.91", out)
    assert re.search(r"1\s+a bad movie\s+negative", out)
    reg = stub_cli("predict", "ft:minilm-l6:p::reg", "x")
    assert re.search(r"0\s+x\s+0\.5", reg)


def test_chat(stub_cli: Cli, stub_requests: list[tuple[str, dict[str, Any]]]) -> None:
    assert stub_cli("chat", "ft:tiny-lm:p::c", "hi", "--system", "be brief").strip() == "Hello there!"
    assert stub_requests[-1][1]["messages"] == [{"role": "system", "content": "be brief"},
                                                {"role": "user", "content": "hi"}]
    assert stub_cli("chat", "ft:tiny-lm:p::c", "hi", "--stream").strip() == "Hello!"


def test_help_lists_the_user_commands(cli: Cli) -> None:
    out = cli("--help")
    for name in ("files", "jobs", "models", "predict", "chat", "serve", "worker", "migrate"):
        assert name in out
    jobs = cli("jobs", "--help")
    for name in ("create", "list", "get", "cancel", "events", "follow", "checkpoints", "plot"):
        assert name in jobs
