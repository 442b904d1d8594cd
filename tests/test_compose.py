"""docker-compose.yml, Dockerfile and .dockerignore stay in step with the code: every command a
container runs names a real CLI subcommand (with real options), module or Celery app; health
checks and depends_on agree; the image builds from files that exist. Docker itself is not run."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
OUR_IMAGES = {name for name, svc in SERVICES.items() if "build" in svc}
# Read with getattr by app/inference/runtime.py until Settings gains the field.


def _commands(svc: dict[str, Any]) -> list[list[str]]:
    """The command's programs: `sh -c "a && exec b"` becomes [a...], [b...]."""
    cmd = svc.get("command")
    if cmd is None:
        return []
    argv = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
    if argv[:2] != ["sh", "-c"]:
        return [argv]
    out = []
    for part in re.split(r"&&|\|\||;", argv[2]):
        words = shlex.split(part)
        out.append(words[1:] if words[:1] == ["exec"] else words)
    return [w for w in out if w]


@cache
def _cli_help(*sub: str) -> str:
    from app.cli import app
    from app.cli_user import register

    register(app)
    result = CliRunner().invoke(app, [*sub, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, f"`tunehouse {' '.join(sub)}` does not exist:\n{result.output}"
    return result.output


def _options(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("--")]


def _check_tunehouse(words: list[str]) -> None:
    sub = [w for w in words[1:] if not w.startswith("-")][:1]
    assert sub, f"bare `tunehouse` in {words}"
    text = _cli_help(*sub)
    for opt in _options(words):
        assert opt in text, f"`tunehouse {sub[0]}` has no option {opt}"


def _check_python_m(words: list[str]) -> None:
    assert words[1] == "-m", words
    spec = importlib.util.find_spec(words[2])
    assert spec is not None and spec.origin, f"module {words[2]} not found"
    source = Path(spec.origin).read_text()
    for opt in _options(words[3:]):
        assert f'"{opt}"' in source, f"{words[2]} does not parse {opt}"


def _check_celery(words: list[str]) -> None:
    from celery import Celery

    target = words[words.index("-A") + 1]
    module, _, attr = target.partition(":")
    app = getattr(importlib.import_module(module), attr or "app")
    assert isinstance(app, Celery)
    sub = words[words.index("-A") + 2]
    if sub == "flower":  # the `flower` extra, installed in the image
        assert "flower" in _extras()["flower"][0] and ".[s3,flower]" in (ROOT / "Dockerfile").read_text()
    else:
        assert sub in {"worker", "beat", "inspect", "status"}, sub


CHECKS = {"tunehouse": _check_tunehouse, "python": _check_python_m, "celery": _check_celery}


@pytest.mark.parametrize("name", sorted(OUR_IMAGES))
def test_commands_exist(name: str) -> None:
    commands = _commands(SERVICES[name])
    assert commands, f"{name} has no command"
    for words in commands:
        assert words[0] in CHECKS, f"{name}: unknown program {words[0]}"
        CHECKS[words[0]](words)


def test_expected_services_and_commands() -> None:
    assert {"postgres", "redis", "api", "worker-train", "worker-infer", "flower"} <= set(SERVICES)
    api = _commands(SERVICES["api"])
    assert api[0][:2] == ["tunehouse", "migrate"] and api[1][:2] == ["tunehouse", "serve"]
    assert "--no-worker" in api[1] and "0.0.0.0" in api[1]
    train = _commands(SERVICES["worker-train"])[0]
    assert train[:2] == ["tunehouse", "worker"] and "training,default" in train
    assert _commands(SERVICES["worker-infer"])[0][:3] == ["python", "-m", "worker.inference_server"]


def _extras() -> dict[str, list[str]]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]  # type: ignore[no-any-return]


def _gpu_devices(name: str) -> list[dict[str, Any]]:
    return SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]  # type: ignore[no-any-return]


def test_gpu_workers_are_pinned_to_their_own_gpu() -> None:
    """`count: 1` lets Docker give every container GPU 0: each GPU service names its device instead,
    training and inference different ones by default."""
    train, infer = _gpu_devices("worker-train"), _gpu_devices("worker-infer")
    assert train == [{"driver": "nvidia", "device_ids": ["${TRAIN_GPU:-0}"], "capabilities": ["gpu"]}]
    assert infer == [{"driver": "nvidia", "device_ids": ["${INFER_GPU:-1}"], "capabilities": ["gpu"]}]
    for name, svc in SERVICES.items():
        for dev in (svc.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices", []):
            assert "count" not in dev, f"{name} reserves GPUs by count"


def test_flower_requires_a_password_and_binds_locally() -> None:
    svc = SERVICES["flower"]
    auth = svc["environment"]["FLOWER_BASIC_AUTH"]
    assert auth.startswith("${FLOWER_USER:?") and ":${FLOWER_PASSWORD:?" in auth
    assert svc["ports"] == ["${FLOWER_BIND:-127.0.0.1}:5555:5555"]
    assert "/healthcheck" in (_python_healthcheck(svc["healthcheck"]["test"]) or "")  # open without auth


def _python_healthcheck(test: list[str]) -> str | None:
    return test[3] if test[:3] == ["CMD", "python", "-c"] else None


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_healthchecks(name: str) -> None:
    svc = SERVICES[name]
    if svc.get("profiles"):
        return
    test = svc["healthcheck"]["test"]
    code = _python_healthcheck(test)
    if code is None:
        assert test[0] in ("CMD", "CMD-SHELL")
        return
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            assert all(hasattr(module, a.name) for a in node.names), code
    if name == "api":
        assert "/readyz" in code


def test_postgres_and_redis_healthchecks() -> None:
    assert "pg_isready" in " ".join(SERVICES["postgres"]["healthcheck"]["test"])
    assert "ping" in SERVICES["redis"]["healthcheck"]["test"]


def test_depends_on_waits_for_health() -> None:
    for name, svc in SERVICES.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
            assert cond["condition"] == "service_healthy", (name, dep)
            assert "healthcheck" in SERVICES[dep], f"{dep} has no healthcheck"
    for worker in ("worker-train", "worker-infer"):
        assert {"postgres", "redis", "api"} <= set(SERVICES[worker]["depends_on"])


def test_named_volumes() -> None:
    declared = set(COMPOSE["volumes"])
    assert {"pgdata", "artifacts"} <= declared
    for name, svc in SERVICES.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} mounts undeclared volume {source}"
    assert "pgdata:/var/lib/postgresql/data" in SERVICES["postgres"]["volumes"]


def test_environment_matches_settings() -> None:
    fields = set(Settings.model_fields)
    for name in OUR_IMAGES:
        env = SERVICES[name].get("environment") or {}
        for key in env:
            if name == "flower" and key.startswith("FLOWER_"):
                continue
            assert key.startswith("TUNEHOUSE_"), (name, key)
            assert key.removeprefix("TUNEHOUSE_").lower() in fields, f"{name}: {key} is not a setting"
        assert env["TUNEHOUSE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["TUNEHOUSE_BROKER_URL"] == "redis://redis:6379/0"


def test_artifacts_volume_is_shared_where_the_url_points() -> None:
    for name in ("api", "worker-train", "worker-infer"):
        svc = SERVICES[name]
        path = svc["environment"]["TUNEHOUSE_ARTIFACT_URL"].removeprefix("file://")
        assert f"artifacts:{path}" in svc["volumes"], name


# --- Dockerfile ---------------------------------------------------------------------------------

DOCKERFILE = (ROOT / "Dockerfile").read_text()
DOCKERIGNORE = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]


def _stages() -> list[tuple[str, list[str]]]:
    stages: list[tuple[str, list[str]]] = []
    for line in DOCKERFILE.splitlines():
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if m:
            stages.append((m.group(1), []))
        elif stages and line.strip() and not line.startswith("#"):
            stages[-1][1].append(line.strip())
    return stages


def test_dockerfile_stages_and_non_root_user() -> None:
    stages = dict(_stages())
    assert {"builder", "runtime"} <= set(stages)
    assert list(stages)[-1] == "runtime"
    users = [ln.split()[1] for ln in stages["runtime"] if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(ln.startswith("COPY --from=builder") for ln in stages["runtime"])
    assert "EXPOSE 8000" in stages["runtime"]
    for svc in SERVICES.values():
        if "build" in svc:
            assert svc["build"].get("target", "runtime") in stages


def test_torch_pin_and_index_arg() -> None:
    from packaging.requirements import Requirement

    version = re.search(r"ARG TORCH_VERSION=(\S+)", DOCKERFILE).group(1)  # type: ignore[union-attr]
    assert version == "2.13.0"
    pyproject = (ROOT / "pyproject.toml").read_text()
    spec = Requirement(re.search(r'"(torch[^"]*)"', pyproject).group(1)).specifier  # type: ignore[union-attr]
    assert spec.contains(version)
    assert "ARG TORCH_INDEX=cpu" in DOCKERFILE
    assert "download.pytorch.org/whl/${TORCH_INDEX}" in DOCKERFILE
    for svc in SERVICES.values():
        for arg in (svc.get("build") or {}).get("args", {}):
            assert f"ARG {arg}" in DOCKERFILE


def test_copied_files_exist_and_are_in_the_build_context() -> None:
    for line in DOCKERFILE.splitlines():
        if not line.startswith("COPY ") or "--from=" in line:
            continue
        sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY source {src} is missing"
            assert src.rstrip("/") not in DOCKERIGNORE, f"{src} is excluded by .dockerignore"


def test_every_package_is_copied_into_both_stages() -> None:
    """The image runs from the source tree: each top-level package must be in the builder (pip install)
    and in the runtime stage."""
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for name in (p.rstrip("*") for p in packages["include"]):
        for stage, lines in _stages():
            assert any(ln.startswith("COPY") and f" {name} ./{name}" in ln for ln in lines), (name, stage)


def test_dockerignore_keeps_local_state_out() -> None:
    for entry in (".git", ".venv", "data", ".env"):
        assert entry in DOCKERIGNORE


def test_prometheus_scrapes_the_api() -> None:
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert "api:8000" in job["static_configs"][0]["targets"]


def test_internal_and_operator_tokens() -> None:
    """worker-infer takes only calls bearing the API's internal token (required: compose refuses to start
    without it); Prometheus scrapes /metrics with the operator token, mounted as a secret."""
    for name in ("api", "worker-infer"):
        env = SERVICES[name]["environment"]
        assert env["TUNEHOUSE_INTERNAL_TOKEN"].startswith("${TUNEHOUSE_INTERNAL_TOKEN:?"), name
    assert SERVICES["api"]["environment"]["TUNEHOUSE_OPERATOR_TOKEN"] == "${TUNEHOUSE_OPERATOR_TOKEN:-}"
    assert COMPOSE["secrets"]["operator_token"] == {"environment": "TUNEHOUSE_OPERATOR_TOKEN"}
    assert any(str(s).startswith("operator_token") for s in SERVICES["prometheus"]["secrets"])
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["authorization"] == {
        "type": "Bearer", "credentials_file": "/run/secrets/operator_token"}
