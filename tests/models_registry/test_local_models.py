"""`tunehouse models add --path DIR --id NAME`: an operator registers a local model directory as a
base model, validated (safetensors only, a known architecture, no remote code), shown in /v1/models
and usable by jobs without a restart."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.cli import add_model, remove_model
from app.models_registry.catalog import get_spec, local_base
from app.settings import get_settings


@pytest.fixture
def models_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "models.json"
    monkeypatch.setattr(get_settings(), "models_file", path)
    return path


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A real decoder directory (the built tiny-lm) copied where an operator would keep it."""
    dst = tmp_path / "my-model"
    shutil.copytree(local_base("tiny-lm").path, dst)
    return dst


def _cli(*args: str) -> tuple[int, str]:
    cli, models = typer.Typer(), typer.Typer()
    cli.add_typer(models, name="models")
    models.command("add")(add_model)
    models.command("remove")(remove_model)
    result = CliRunner().invoke(cli, ["models", *args])
    return result.exit_code, result.output


@pytest.mark.usefixtures("models_file")
def test_add_lists_and_serves_the_spec(model_dir: Path, client: TestClient) -> None:
    code, out = _cli("add", "--path", str(model_dir), "--id", "my-lm", "--max-seq-length", "128")
    assert code == 0, out
    assert "decoder (llama)" in out and "causal_lm" in out
    spec = get_spec("my-lm")
    assert spec.source == f"path:{model_dir.resolve()}" and spec.max_seq_length == 128
    assert spec.lora_target_modules == ["q_proj", "v_proj"] and local_base("my-lm").path == model_dir.resolve()
    assert "qlora" in spec.training_types  # a decoder: QLoRA offered (CUDA workers run it)
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed["my-lm"]["kind"] == "base" and "causal_lm" in listed["my-lm"]["tasks"]
    assert _cli("remove", "my-lm")[0] == 0
    assert "my-lm" not in {m["id"] for m in client.get("/v1/models").json()["data"]}


@pytest.mark.usefixtures("models_file")
@pytest.mark.parametrize(("breakage", "message"), [
    ("pickle", "no .safetensors weights (found pytorch_model.bin"),
    ("remote_code", "never runs remote code"),
    ("unknown_arch", "unknown architecture 'not-a-model'"),
    ("no_config", "no config.json"),
])
def test_unsafe_or_unknown_directories_are_refused(model_dir: Path, breakage: str, message: str) -> None:
    config = model_dir / "config.json"
    if breakage == "pickle":
        for f in model_dir.glob("*.safetensors"):
            f.rename(model_dir / "pytorch_model.bin")
    elif breakage == "remote_code":
        config.write_text(json.dumps({**json.loads(config.read_text()), "auto_map": {"AutoModel": "x.Y"}}))
    elif breakage == "unknown_arch":
        config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "not-a-model"}))
    else:
        config.unlink()
    code, out = _cli("add", "--path", str(model_dir), "--id", "bad")
    assert code == 2 and message in out
    assert not get_settings().resolved_models_file.exists()  # nothing was registered


@pytest.mark.usefixtures("models_file")
def test_a_shipped_id_cannot_be_shadowed(model_dir: Path) -> None:
    code, out = _cli("add", "--path", str(model_dir), "--id", "tiny-lm")
    assert code == 2 and "shipped base model" in out
    assert _cli("remove", "never-added") == (2, "error: No registered model 'never-added'.\n")
    assert get_spec("tiny-lm").source.startswith("builtin:")
