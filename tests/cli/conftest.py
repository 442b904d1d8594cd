"""The CLI against real HTTP servers: the tunehouse API under uvicorn in a thread (real commits,
so tests use `committed_db`), and a stub inference API for predict/chat."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import typer
import uvicorn
from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from app.auth.service import create_api_key, get_or_create_project
from app.cli import app as cli_app
from app.cli_user import register
from app.main import create_app


class LiveServer:
    def __init__(self, app: FastAPI, port: int = 0) -> None:
        if not port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        # An open event stream never ends by itself: cut it a second into shutdown (a restart test).
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, lifespan="off", log_level="warning",
                                timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def api_server() -> Iterator[LiveServer]:
    with LiveServer(create_app()) as server:
        yield server


@pytest.fixture
def api_key(committed_db: sessionmaker[Session]) -> str:
    with committed_db() as s:
        key = create_api_key(s, get_or_create_project(s, "cli-tests"), "cli")
        s.commit()
    return key


@pytest.fixture(scope="session")
def tunehouse() -> typer.Typer:
    register(cli_app)
    return cli_app


class Cli:
    """Runs `tunehouse ...` in-process with the server URL and key in the environment."""

    def __init__(self, app: typer.Typer, base_url: str, api_key: str) -> None:
        self.app, self.runner = app, CliRunner()
        self.env = {"TUNEHOUSE_BASE_URL": base_url, "TUNEHOUSE_API_KEY": api_key, "COLUMNS": "250",
                    "OPENAI_BASE_URL": "", "OPENAI_API_KEY": ""}

    def __call__(self, *args: str, code: int = 0) -> str:
        result = self.runner.invoke(self.app, list(args), env=self.env)
        assert result.exit_code == code, (result.exit_code, result.output, result.exception)
        return result.output


@pytest.fixture
def cli(tunehouse: typer.Typer, api_server: LiveServer, api_key: str) -> Cli:
    return Cli(tunehouse, api_server.url, api_key)


# --- a stub inference API (the real one needs trained models) ---------------------------------------

@pytest.fixture(scope="session")
def stub_requests() -> list[tuple[str, dict[str, Any]]]:
    return []


@pytest.fixture(scope="session")
def stub_server(stub_requests: list[tuple[str, dict[str, Any]]]) -> Iterator[LiveServer]:
    stub = FastAPI()

    @stub.post("/v1/predictions")
    def predictions(body: dict[str, Any]) -> dict[str, Any]:
        stub_requests.append(("predictions", body))
        data: list[dict[str, Any]]
        if body["model"].endswith("reg"):
            data = [{"index": i, "value": 0.5 + i} for i, _ in enumerate(body["input"])]
        else:
            data = [{"index": i, "label": "positive" if "good" in t else "negative", "score": 0.91,
                     "scores": {"positive": 0.91 if "good" in t else 0.09,
                                "negative": 0.09 if "good" in t else 0.91}}
                    for i, t in enumerate(body["input"])]
        return {"object": "list", "model": body["model"], "data": data,
                "usage": {"prompt_tokens": 3, "total_tokens": 3}}

    @stub.post("/v1/chat/completions")
    def chat(body: dict[str, Any]) -> Any:
        stub_requests.append(("chat", body))
        if body.get("stream"):
            from fastapi.responses import StreamingResponse

            chunks = [f'data: {{"choices": [{{"index": 0, "delta": {{"content": "{w}"}}}}]}}\n\n'
                      for w in ("Hel", "lo", "!")]
            return StreamingResponse(iter([*chunks, "data: [DONE]\n\n"]), media_type="text/event-stream")
        return {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "Hello there!"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}

    with LiveServer(stub) as server:
        yield server


@pytest.fixture
def stub_cli(tunehouse: typer.Typer, stub_server: LiveServer) -> Cli:
    return Cli(tunehouse, stub_server.url + "/v1", "sk-stub")
