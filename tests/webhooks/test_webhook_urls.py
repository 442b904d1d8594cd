"""SSRF through `webhook_url`: job creation refuses URLs that are malformed, not https, carry
credentials or reach a non-public address, unless the operator allowed them; and webhooks need a
signing secret. The resolver is faked: no test looks a public name up."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.orm import Job, Project
from app.settings import Settings, get_settings
from app.webhooks import urls
from tests.jobs.factories import make_file

PUBLIC = "93.184.216.34"
ANSWERS = {"hooks.example.com": [PUBLIC], "mixed.example.com": [PUBLIC, "10.0.0.7"],
           "v6.example.com": ["2606:2800:220:1:248:1893:25c8:1946"], "rebind.example.com": ["fd00::5"],
           "hooks.corp.internal": ["10.20.30.40"]}


@pytest.fixture(autouse=True)
def resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names from ANSWERS; numeric forms (127.1, 2130706433) parsed locally; anything else unknown."""
    def fake(host: str, port: int) -> list[str]:
        if host in ANSWERS:
            return ANSWERS[host]
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        return [str(i[4][0]) for i in infos]

    monkeypatch.setattr(urls, "resolve", fake)


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "webhook_secret", "test-secret")


@pytest.fixture
def chat_file(db: Session, project_client: tuple[TestClient, Project]) -> str:
    return make_file(db, project_client[1], "chat", rows=40).id


def _create(client: TestClient, chat_file: str, url: str) -> Any:
    return client.post("/v1/fine_tuning/jobs", json={"model": "tiny-lm", "training_file": chat_file,
                                                     "webhook_url": url})


REFUSED = [
    "https://127.0.0.1/h", "https://127.0.0.1:8080/h", "https://localhost/h", "https://LOCALHOST./h",
    "https://api.localhost/h", "https://[::1]/h", "https://169.254.169.254/latest/meta-data/",
    "https://10.1.2.3/h", "https://192.168.0.10/h", "https://172.16.5.4/h", "https://100.64.0.1/h",
    "https://0.0.0.0/h", "https://224.0.0.1/h", "https://255.255.255.255/h", "https://240.0.0.1/h",
    "https://[fd00::1]/h", "https://[fe80::1]/h", "https://[fec0::1]/h", "https://[ff02::1]/h", "https://[::]/h",
    "https://[::ffff:127.0.0.1]/h", "https://[::ffff:169.254.169.254]/h", "https://[2002:7f00:1::]/h",
    "https://[64:ff9b::a00:1]/h", "https://[::7f00:1]/h", "https://127.1/h", "https://2130706433/h",
    "https://mixed.example.com/h", "https://rebind.example.com/h",
]


@pytest.mark.parametrize("url", REFUSED)
def test_non_public_addresses_are_refused(client: TestClient, chat_file: str, secret: None, url: str) -> None:
    r = _create(client, chat_file, url)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("invalid_webhook_url", "webhook_url")
    assert err["message"] == "webhook_url resolves to a non-public address."  # never which one


@pytest.mark.parametrize(("url", "problem"), [
    ("https://hooks.example.com/h\r\nX-Injected: 1", "control characters"),
    ("https://hooks.example.com/h\n", "control characters"),
    ("https://hooks.example.com/a b", "whitespace"),
    ("https://hooks.example.com\\@127.0.0.1/", "backslashes"),
    ("https://user:pw@hooks.example.com/h", "credentials"),
    ("https://user@hooks.example.com/h", "credentials"),
    ("ftp://hooks.example.com/h", "must use https"),
    ("http://hooks.example.com/h", "must use https"),  # http not allowed by the operator
    ("hooks.example.com/h", "must use https"),
    ("", "must use https"),
    ("https:///h", "no host"),
    ("https://hooks.example.com:0/h", "invalid port"),
    ("https://hooks.example.com:70000/h", "invalid port"),
    ("https://hooks.example.com:port/h", "not a valid URL"),
    ("https://nowhere.example.com/h", "does not resolve"),
])
def test_malformed_urls_are_refused(client: TestClient, chat_file: str, secret: None, url: str,
                                    problem: str) -> None:
    r = _create(client, chat_file, url)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("invalid_webhook_url", "webhook_url")
    assert problem in err["message"]


def test_a_nul_in_the_url_is_refused_by_the_request_guard(client: TestClient, chat_file: str,
                                                          secret: None) -> None:
    """NUL never reaches the webhook check: the app-wide input guard refuses it first (Postgres could not
    store it), naming the field."""
    r = _create(client, chat_file, "https://hooks.example.com/\x00")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("invalid_value", "webhook_url") and "NUL" in err["message"]


def test_webhook_needs_a_signing_secret(client: TestClient, chat_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "webhook_secret", "")
    r = _create(client, chat_file, "https://hooks.example.com/h")
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("webhook_secret_missing", "webhook_url")
    assert "TUNEHOUSE_WEBHOOK_SECRET" in err["message"]
    assert _create(client, chat_file, "").status_code == 400  # not an "unset" webhook either


def test_public_url_is_accepted(client: TestClient, chat_file: str, secret: None, db: Session) -> None:
    r = _create(client, chat_file, "https://hooks.example.com/tunehouse?k=1")
    assert r.status_code == 200, r.text
    job = db.get(Job, r.json()["id"])
    assert job is not None and job.webhook_url == "https://hooks.example.com/tunehouse?k=1"


@pytest.mark.parametrize(("allowed", "url"), [
    (["127.0.0.1"], "https://127.0.0.1:9000/h"),
    (["10.0.0.0/8"], "https://10.1.2.3/h"),
    (["fd00::/8"], "https://[fd00::1]/h"),
    (["hooks.corp.internal"], "https://hooks.corp.internal/h"),
    (["10.20.0.0/16"], "https://hooks.corp.internal/h"),
])
def test_operator_allowlist(allowed: list[str], url: str) -> None:
    settings = get_settings().model_copy(update={"webhook_allowed_hosts": allowed})
    assert urls.check(url, settings).url.host
    with pytest.raises(urls.UnsafeWebhookUrl):
        urls.check(url, get_settings().model_copy(update={"webhook_allowed_hosts": ["192.0.2.0/24"]}))


def test_http_only_when_allowed() -> None:
    allowed = get_settings().model_copy(update={"webhook_allow_http": True})
    assert urls.check("http://hooks.example.com/h", allowed).pinned_url == f"http://{PUBLIC}/h"
    with pytest.raises(urls.UnsafeWebhookUrl, match="https"):
        urls.check("http://hooks.example.com/h", get_settings().model_copy(update={"webhook_allow_http": False}))


def test_ipv6_target_is_pinned_in_brackets() -> None:
    target = urls.check("https://v6.example.com:8443/h", get_settings())
    assert str(target.pinned_url) == "https://[2606:2800:220:1:248:1893:25c8:1946]:8443/h"
    assert target.host_header == "v6.example.com:8443"
    assert target.extensions == {"sni_hostname": "v6.example.com"}


def test_refusal_detail_is_for_logs_only() -> None:
    with pytest.raises(urls.UnsafeWebhookUrl) as info:
        urls.check("https://mixed.example.com/h", get_settings())
    assert "10.0.0.7" in str(info.value) and "10.0.0.7" not in info.value.public


@pytest.mark.parametrize(("address", "public"), [
    (PUBLIC, True), ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("2002:5db8:d822::", True),
    ("127.0.0.1", False), ("10.0.0.1", False), ("172.31.255.255", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.100.100.200", False), ("198.18.0.1", False), ("192.0.2.1", False),
    ("::1", False), ("fc00::1", False), ("fe80::1", False), ("ff0e::1", False), ("2001:db8::1", False),
    ("::ffff:10.0.0.1", False), ("2002:a00:1::", False), ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),
])
def test_is_public(address: str, public: bool) -> None:
    assert urls.is_public(ipaddress.ip_address(address)) is public


def test_allowed_hosts_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEHOUSE_WEBHOOK_ALLOWED_HOSTS", "hooks.corp.internal, 10.0.0.0/8")
    monkeypatch.setenv("TUNEHOUSE_WEBHOOK_ALLOW_HTTP", "true")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.webhook_allowed_hosts == ["hooks.corp.internal", "10.0.0.0/8"]
    assert settings.webhook_allow_http is True
