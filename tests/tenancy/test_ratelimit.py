"""Requests per minute per API key: 429 with Retry-After past the limit, OpenAI's x-ratelimit headers
on every authenticated response, counted in Redis (the test broker) or in-process without it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.auth.service import create_api_key
from app.orm import Project
from app.tenancy.ratelimit import LocalCounter, duration
from tests.conftest import USING_REDIS

Client = tuple[TestClient, Project]


def _limited(client: TestClient, n: int) -> list[int]:
    return [client.get("/v1/files").status_code for _ in range(n)]


def test_429_after_the_limit_with_headers(project_client: Client, set_limits: Callable[..., None]) -> None:
    client, project = project_client
    set_limits(project, rpm_limit=3)
    for remaining in (2, 1, 0):
        r = client.get("/v1/files")
        assert r.status_code == 200, r.text
        assert r.headers["x-ratelimit-limit-requests"] == "3"
        assert r.headers["x-ratelimit-remaining-requests"] == str(remaining)
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
    r = client.get("/v1/files")
    assert r.status_code == 429
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("requests", "rate_limit_exceeded")
    assert "3 requests per minute" in err["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    # Errors of authenticated requests carry the headers too (a 404 here, counted as the 5th request).
    set_limits(project, rpm_limit=10)
    r = client.get("/v1/files/file-nope")
    assert r.status_code == 404 and r.headers["x-ratelimit-remaining-requests"] == "5"


def test_the_limit_is_per_key(app: FastAPI, project_client: Client, db: Session,
                              set_limits: Callable[..., None]) -> None:
    client, project = project_client
    set_limits(project, rpm_limit=2)
    assert _limited(client, 3) == [200, 200, 429]
    other = TestClient(app, headers={"Authorization": f"Bearer {create_api_key(db, project, 'second')}"})
    db.commit()
    assert _limited(other, 3) == [200, 200, 429]


def test_settings_default_and_unlimited(project_client: Client, set_limits: Callable[..., None],
                                        settings: Callable[..., object]) -> None:
    client, project = project_client
    r = client.get("/v1/files")  # default 0: unlimited, no headers
    assert r.status_code == 200 and "x-ratelimit-limit-requests" not in r.headers
    settings(rate_limit_rpm=2)
    assert _limited(client, 3) == [200, 200, 429]  # the request above was not counted: no limit then
    set_limits(project, rpm_limit=0)  # a project override of 0: unlimited whatever the default
    assert _limited(client, 3) == [200, 200, 200]


def test_unauthenticated_requests_are_not_counted(client: TestClient, project_client: Client,
                                                  set_limits: Callable[..., None]) -> None:
    set_limits(project_client[1], rpm_limit=1)
    anonymous = TestClient(client.app)
    r = anonymous.get("/v1/files")
    assert r.status_code == 401 and "x-ratelimit-limit-requests" not in r.headers
    assert _limited(client, 2) == [200, 429]


@pytest.mark.parametrize("broker", ["", "redis://127.0.0.1:1/0"], ids=["embedded", "redis-down"])
def test_in_process_limiter_without_redis(broker: str, project_client: Client, set_limits: Callable[..., None],
                                          settings: Callable[..., object]) -> None:
    client, project = project_client
    settings(broker_url=broker)
    set_limits(project, rpm_limit=2)
    assert _limited(client, 3) == [200, 200, 429]


@pytest.mark.skipif(not USING_REDIS, reason="needs Redis")
def test_redis_window_is_shared_and_expires(project_client: Client, set_limits: Callable[..., None]) -> None:
    import redis

    from app.settings import get_settings

    client, project = project_client
    set_limits(project, rpm_limit=5)
    client.get("/v1/files")
    r = redis.Redis.from_url(get_settings().broker_url)
    keys = r.keys("tunehouse:rl:*")
    assert keys and all(0 < r.pttl(k) <= 60_000 for k in keys)


def test_local_counter_window_resets() -> None:
    counter = LocalCounter()
    assert [counter.hit("k", 60)[0] for _ in range(3)] == [1, 2, 3]
    assert counter.hit("other", 60)[0] == 1
    n, reset = counter.hit("short", 0.0)  # a zero window: every hit starts a new one
    assert (n, counter.hit("short", 0.0)[0]) == (1, 1) and reset <= 0


def test_duration_format() -> None:
    assert [duration(s) for s in (0.02, 1.0, 1.5, 59.94, 60.0, 75.25)] == ["20ms", "1s", "1.5s", "59.9s",
                                                                          "1m0s", "1m15.2s"]
