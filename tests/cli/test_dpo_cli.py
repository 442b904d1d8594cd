"""`tunehouse jobs create --method dpo --beta ...` against a live server."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.conftest import Cli
from tests.ml.training import datasets as ds


def test_jobs_create_dpo(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ds.preference_rows(8)))
    job_id = cli("jobs", "create", "--model", "tiny-lm", "--training-file", str(path), "--method", "dpo",
                 "--beta", "0.3", "--epochs", "1", "--quiet").strip().splitlines()[-1]
    job = json.loads(cli("jobs", "get", job_id, "--json"))
    assert job["method"]["type"] == "dpo"
    assert job["method"]["dpo"]["hyperparameters"]["beta"] == 0.3
    assert job["method"]["dpo"]["hyperparameters"]["n_epochs"] == 1
    refused = cli("jobs", "create", "--model", "tiny-lm", "--training-file", str(path), code=1)
    assert "Error 400" in refused and "method" in refused  # preference pairs need --method dpo
    bad = cli("jobs", "create", "--model", "tiny-lm", "--training-file", str(path), "--method", "supervised",
              "--beta", "0.3", code=2)
    assert "--beta" in bad
