"""Test plumbing: real Postgres (migrations applied once, a rolled-back transaction per test)
and real Redis. In CI (CI=true) an unreachable Postgres or Redis fails the run loudly;
elsewhere the suite falls back to SQLite and the embedded broker and says so."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

_TMP = Path(tempfile.mkdtemp(prefix="tunehouse-test-"))
PG_URL = os.environ.get("TUNEHOUSE_TEST_DATABASE_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/tunehouse_test")
REDIS_URL = os.environ.get("TUNEHOUSE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _pg_reachable(url: str) -> str | None:
    import psycopg

    admin = url.replace("postgresql+psycopg://", "postgresql://").rsplit("/", 1)[0] + "/postgres"
    dbname = url.rsplit("/", 1)[1]
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{dbname}"')
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _redis_reachable(url: str) -> str | None:
    import redis

    try:
        r = redis.Redis.from_url(url, socket_connect_timeout=3)
        r.flushdb()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


_pg_error = _pg_reachable(PG_URL)
_redis_error = _redis_reachable(REDIS_URL)
if IN_CI and (_pg_error or _redis_error):
    raise SystemExit(
        "CI needs real services and they are unreachable:\n"
        f"  Postgres {PG_URL}: {_pg_error or 'ok'}\n  Redis {REDIS_URL}: {_redis_error or 'ok'}"
    )

USING_PG = _pg_error is None
USING_REDIS = _redis_error is None
os.environ["TUNEHOUSE_ENV"] = "test"
os.environ["TUNEHOUSE_DATA_DIR"] = str(_TMP / "data")
os.environ["TUNEHOUSE_DATABASE_URL"] = PG_URL if USING_PG else f"sqlite:///{_TMP / 'test.db'}"
os.environ["TUNEHOUSE_BROKER_URL"] = REDIS_URL if USING_REDIS else ""
os.environ["TUNEHOUSE_LOG_JSON"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import Connection, text  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from app.auth.service import create_api_key, get_or_create_project  # noqa: E402
from app.kit.db import Base, get_engine, get_sessionmaker  # noqa: E402
from app.kit.migrate import upgrade_head  # noqa: E402
from app.main import create_app  # noqa: E402
from app.orm import Project  # noqa: E402
from app.settings import get_settings  # noqa: E402


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"tunehouse: database={'postgres' if USING_PG else 'sqlite (Postgres unreachable: ' + str(_pg_error) + ')'}",
        f"tunehouse: broker={'redis' if USING_REDIS else 'embedded (Redis unreachable)'}",
    ]


@pytest.fixture(scope="session", autouse=True)
def _migrated() -> None:
    upgrade_head(get_settings().resolved_database_url)


@pytest.fixture
def connection() -> Iterator[Connection]:
    conn = get_engine().connect()
    trans = conn.begin()
    try:
        yield conn
    finally:
        trans.rollback()
        conn.close()


@pytest.fixture
def session_factory(connection: Connection) -> sessionmaker[Session]:
    # Commits inside the app become savepoint releases; the outer transaction is rolled back.
    return sessionmaker(bind=connection, expire_on_commit=False, join_transaction_mode="create_savepoint")


@pytest.fixture
def db(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    session = session_factory()
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def app(session_factory: sessionmaker[Session]) -> FastAPI:
    application = create_app()
    application.state.sessionmaker = session_factory
    return application


def _make_client(app: FastAPI, db: Session, name: str) -> tuple[TestClient, Project]:
    project = get_or_create_project(db, name)
    key = create_api_key(db, project, "test")
    db.commit()
    client = TestClient(app, headers={"Authorization": f"Bearer {key}"})
    client.api_key = key  # type: ignore[attr-defined]
    return client, project


@pytest.fixture
def project_client(app: FastAPI, db: Session) -> tuple[TestClient, Project]:
    return _make_client(app, db, "project-a")


@pytest.fixture
def client(project_client: tuple[TestClient, Project]) -> TestClient:
    return project_client[0]


@pytest.fixture
def other_client(app: FastAPI, db: Session) -> TestClient:
    return _make_client(app, db, "project-b")[0]


@pytest.fixture
def committed_db() -> Iterator[sessionmaker[Session]]:
    """For tests that cross processes or threads (workers): real commits, tables emptied after."""
    yield get_sessionmaker()
    with get_engine().begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(text(f"DELETE FROM {table.name}"))


@pytest.fixture(scope="session")
def tmp_data() -> Path:
    return _TMP
