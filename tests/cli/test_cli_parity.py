"""CLI parity with the API (pause/resume, estimate, files clean/delete), `jobs get` and list output, and
`--follow` surviving an API restart."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import typer
from rich.console import Console
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app import cli_user
from app.cli_user import Api, Follower, SseEvent, _table
from app.main import create_app
from app.orm import Job
from tests.cli.conftest import Cli, LiveServer
from tests.cli.test_cli import CHAT, _create_job, _jsonl, _simulate_training, _upload


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    return _jsonl(tmp_path / "train.jsonl", [CHAT] * 12)


def _wait_for(cond: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# --- jobs pause / resume / estimate / get ----------------------------------------------------------

def test_pause_and_resume(cli: Cli, chat_file: Path) -> None:
    job_id = _create_job(cli, _upload(cli, chat_file))
    assert f"{job_id}: paused" in cli("jobs", "pause", job_id)
    assert f"{job_id}: queued" in cli("jobs", "resume", job_id)
    again = cli("jobs", "resume", job_id, code=1)
    assert "Error 409" in again and "job_not_paused" in again
    cli("jobs", "cancel", job_id)
    assert "job_not_pausable" in cli("jobs", "pause", job_id, code=1)


def test_estimate(cli: Cli, chat_file: Path) -> None:
    file_id = _upload(cli, chat_file)
    out = cli("jobs", "estimate", "--model", "tiny-lm", "--training-file", file_id, "--epochs", "2",
              "--batch-size", "4")
    assert "steps" in out and "batch size 4" in out and "x 2 epochs" in out and "tokens/s" in out
    out = cli("jobs", "estimate", "--model", "tiny-lm", "--training-file", str(chat_file), "--json")
    raw = json.loads(out[out.index("{"):])  # after the upload note (stderr, mixed in by the runner)
    assert raw["object"] == "fine_tuning.estimate" and raw["examples"] == 12
    bad = cli("jobs", "estimate", "--model", "no-such-model", "--training-file", file_id, code=1)
    assert "Error 4" in bad and "no-such-model" in bad


def test_get_shows_eta_only_while_running(cli: Cli, chat_file: Path, committed_db: sessionmaker[Session]) -> None:
    job_id = _create_job(cli, _upload(cli, chat_file))

    def set_job(status: str, eta: int) -> None:
        with committed_db() as s:
            s.execute(update(Job).where(Job.id == job_id).values(
                status=status, progress={"step": 6, "total_steps": 6, "epoch": 2.0, "eta_seconds": eta}))
            s.commit()

    set_job("running", 75)
    assert "6/6 epoch 2.0 ETA 1m15s" in cli("jobs", "get", job_id)
    set_job("succeeded", 0)
    got = cli("jobs", "get", job_id)
    assert "6/6 epoch 2.0" in got and "ETA" not in got


# --- files clean / delete ---------------------------------------------------------------------------

def test_files_clean_and_delete(cli: Cli, chat_file: Path) -> None:
    file_id = _upload(cli, chat_file)
    out = cli("files", "clean", file_id, "--dedupe")
    assert f"Cleaned {file_id} → file-" in out and "1 of 12 rows kept" in out
    cleaned = cli("files", "clean", file_id, "--dedupe", "--scrub-pii", "-q").strip()
    assert cleaned.startswith("file-") and cleaned != file_id
    assert f"Deleted {cleaned}" in cli("files", "delete", cleaned)
    gone = cli("files", "delete", cleaned, code=1)
    assert "Error 404" in gone
    assert "Error 4" in cli("files", "clean", file_id, "--max-tokens", "8", code=1)  # needs --model


# --- listings keep ids whole ------------------------------------------------------------------------

def test_piped_listings_are_one_tab_separated_line_per_item(cli: Cli, chat_file: Path) -> None:
    cli.env["COLUMNS"] = "30"  # narrow: a table would fold the ids
    lines = cli("models", "list").splitlines()
    assert lines and all("\t" in line for line in lines)
    ids = [line.split("\t")[0] for line in lines]
    assert "tiny-lm" in ids and "minilm-l6" in ids
    job_id = _create_job(cli, _upload(cli, chat_file))
    assert job_id in [line.split("\t")[0] for line in cli("jobs", "list").splitlines()]


def test_terminal_tables_never_wrap_ids() -> None:
    long_id = "ft:tiny-lm:cli-tests:demo:ftjob-0123456789abcdefghij"
    con = Console(width=80, force_terminal=True, record=True, file=io.StringIO())
    table = _table("id", "tasks")
    table.add_row(long_id, "causal_lm, classification, regression, masked_lm, and a long tail of words")
    con.print(table)
    assert long_id in con.export_text()


# --- follow -------------------------------------------------------------------------------------

class _FakeApi:
    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        return dict(self.job)


def test_follow_label_tracks_the_job_status() -> None:
    """A lifecycle event refreshes the label at once (no stale "queued (#1)" once the job runs)."""
    api = _FakeApi({"id": "ftjob-x", "status": "queued", "queue_position": 1, "progress": {}})
    follower = Follower(cast(Api, api), "ftjob-x", Console(file=io.StringIO()))
    follower.task = follower.progress.add_task("", total=None, steps="?", loss="-", epoch="-", eta="?")
    follower._poll(force=True)
    assert follower.progress.tasks[0].description == "queued (#1)"
    api.job = {"id": "ftjob-x", "status": "running", "queue_position": 1,
               "progress": {"step": 0, "total_steps": 10, "eta_seconds": 30}}
    follower._handle({"type": "message", "level": "info", "message": "Fine-tuning job started",
                      "created_at": 0, "data": None})
    task = follower.progress.tasks[0]
    assert task.description == "running" and task.fields["eta"] == "0m30s" and task.total == 10


def test_follow_survives_an_api_restart(tunehouse: typer.Typer, api_key: str, chat_file: Path,
                                        committed_db: sessionmaker[Session],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The API goes away mid-follow for longer than the old five reconnects; the follower keeps trying
    (with backoff) and, once a new API answers on the same address, follows the job to its end."""
    pauses: list[float] = []

    def pause(seconds: float) -> None:
        pauses.append(seconds)
        time.sleep(0.02)

    streaming = threading.Event()
    events = Follower._events

    def open_stream(self: Follower) -> Iterator[SseEvent]:
        streaming.set()
        return events(self)

    monkeypatch.setattr(cli_user, "_sleep", pause)
    monkeypatch.setattr(Follower, "_events", open_stream)
    first = LiveServer(create_app()).__enter__()
    cli = Cli(tunehouse, first.url, api_key)
    job_id = _create_job(cli, _upload(cli, chat_file))
    second: list[LiveServer] = []

    def restart() -> None:
        _wait_for(streaming.is_set, "the follower to open the event stream")  # past its first poll
        first.__exit__()
        _wait_for(lambda: len(pauses) >= 10, "reconnect attempts")
        second.append(LiveServer(create_app(), port=first.port).__enter__())
        _simulate_training(committed_db, job_id)

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        out = cli("jobs", "follow", job_id)
    finally:
        thread.join(60)
        for server in second:
            server.__exit__()
    assert out.count("event stream interrupted") == 1 and "gave up" not in out
    assert pauses[:4] == [0.5, 1.0, 2.0, 4.0] and max(pauses) == cli_user.RECONNECT_MAX_DELAY
    assert "Fine-tuning job started" in out and f"Job {job_id} succeeded" in out


def test_follow_gives_up_after_max_wait(cli: Cli, chat_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = _create_job(cli, _upload(cli, chat_file))
    dead = LiveServer(create_app())  # a free port nobody listens on
    polls: list[bool] = []

    def poll(self: Follower, force: bool = False) -> None:  # the job is found once, then the server is gone
        polls.append(force)
        if len(polls) > 1:
            raise httpx.ConnectError("refused")

    monkeypatch.setattr(cli_user, "_sleep", lambda s: time.sleep(0.02))
    monkeypatch.setattr(Follower, "_poll", poll)
    cli.env["TUNEHOUSE_BASE_URL"] = dead.url
    out = cli("jobs", "follow", job_id, "--max-wait", "0.2", code=2)
    assert "gave up: the server was unreachable for 0.2 s" in out and "Cannot reach" in out
    assert len(polls) > 3


def test_help_lists_the_new_commands(cli: Cli) -> None:
    jobs, files = cli("jobs", "--help"), cli("files", "--help")
    assert all(name in jobs for name in ("estimate", "pause", "resume", "download", "follow"))
    assert "clean" in files and "delete" in files
    assert "--max-wait" in cli("jobs", "follow", "--help")
