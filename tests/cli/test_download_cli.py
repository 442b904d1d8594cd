"""`tunehouse jobs download`: streams the tar; on 202 (a worker builds the merged model) it polls."""

from __future__ import annotations

import tarfile
import threading
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.jobs import exports
from tests.cli.conftest import Cli
from tests.jobs.export_fakes import fake_build, fake_lora_final


@pytest.fixture
def lora_job(cli: Cli, committed_db: sessionmaker[Session]) -> str:
    with committed_db() as s:
        return fake_lora_final(s, "cli-tests")  # the `cli` fixture's project


def test_download_polls_until_the_export_is_built(cli: Cli, lora_job: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []

    def worker(export_id: str) -> None:  # the build task, a moment after the 202
        sent.append(export_id)
        threading.Timer(0.3, exports.build_export, args=[export_id]).start()

    monkeypatch.setattr(exports, "_build", fake_build)
    monkeypatch.setattr(exports, "send_build", worker)
    monkeypatch.setattr(exports, "RETRY_AFTER_SECONDS", 1)
    out = cli("jobs", "download", lora_job, "--format", "merged", "-o", str(tmp_path))
    saved = tmp_path / f"{lora_job}-final-merged.tar"
    assert "queued" in out and "Saved" in out and len(sent) == 1
    with tarfile.open(saved) as tar:
        assert f"{lora_job}-final-merged/model.safetensors" in tar.getnames()
    assert not list(tmp_path.glob("*.part"))


def test_download_as_trained_needs_no_worker(cli: Cli, lora_job: str, tmp_path: Path) -> None:
    target = tmp_path / "adapter.tar"
    cli("jobs", "download", lora_job, "final", "-o", str(target))
    with tarfile.open(target) as tar:
        assert f"{lora_job}-final-adapter/adapter_model.safetensors" in tar.getnames()
    out = cli("jobs", "download", lora_job, "ftckpt-nope", code=1)
    assert "Error 404" in out and "checkpoint_not_found" in out
