"""Terminal-status webhooks: payload, Standard-Webhooks-style signature, after-commit sending,
retries with backoff (a real HTTP receiver on 127.0.0.1, allowlisted), each attempt recorded as a
generic event, and the delivery-time guards: re-resolution, pinning, no redirects, no unsigned sends."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.kit import ids
from app.orm import Job, JobEvent, Project
from app.settings import get_settings
from app.webhooks import service, urls
from app.webhooks.service import Delivery, backoff_seconds, build_event, notify_terminal, sign, verify
from tests.jobs.factories import make_file
from tests.jobs.worker_factories import committed_job
from worker import tasks

SECRET = "test-secret"


@dataclass
class Receiver:
    statuses: list[int]
    requests: list[tuple[dict[str, str], str]] = field(default_factory=list)
    url: str = ""
    location: str | None = None  # sent with every response (a redirect target)

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 0


def _serve(rec: Receiver) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"])).decode()
            rec.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(rec.statuses.pop(0) if rec.statuses else 200)
            if rec.location:
                self.send_header("location", rec.location)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rec.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/tunehouse"
    return server


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver(statuses=[])
    server = _serve(rec)
    yield rec
    server.shutdown()
    server.server_close()


@pytest.fixture
def internal() -> Iterator[Receiver]:
    """A second local server standing for an internal service nothing may reach."""
    rec = Receiver(statuses=[])
    server = _serve(rec)
    yield rec
    server.shutdown()
    server.server_close()


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    """Signing on, and the local receiver allowed: http, and 127.0.0.1 on the operator allowlist."""
    monkeypatch.setattr(get_settings(), "webhook_secret", SECRET)
    monkeypatch.setattr(get_settings(), "webhook_max_attempts", 3)
    monkeypatch.setattr(get_settings(), "webhook_allow_http", True)
    monkeypatch.setattr(get_settings(), "webhook_allowed_hosts", ["127.0.0.1"])
    return SECRET


@pytest.fixture
def retries(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Delivery, float | None]]:
    """What the task would send to the broker for the next attempt."""
    sent: list[tuple[Delivery, float | None]] = []
    monkeypatch.setattr(tasks, "send_delivery", lambda d, countdown=None: sent.append((d, countdown)))
    return sent


HOOK = "https://example.com/h"


def _job(db: Session, project: Project, status: str, webhook_url: str | None = HOOK) -> Job:
    f = make_file(db, project)
    job = Job(id=ids.job_id(), project_id=project.id, model="tiny-lm", training_file=f.id, seed=1,
              task="causal_lm", training_type={"type": "lora"}, hyperparameters={}, config={},
              status=status, webhook_url=webhook_url)
    db.add(job)
    db.flush()
    return job


def _webhook_events(factory: sessionmaker[Session], job_id: str) -> list[JobEvent]:
    with factory() as s:
        rows = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq))
        return [e for e in rows if (e.data or {}).get("webhook")]


# --- signing ------------------------------------------------------------------------------------

def test_signature_round_trip_and_tampering() -> None:
    body = '{"id":"whevt-1"}'
    headers = service.headers_for(Delivery("j", "u", "whevt-1", body), SECRET, now=1_700_000_000)
    assert headers["webhook-id"] == "whevt-1"
    assert headers["webhook-signature"].startswith("v1,")
    assert verify(SECRET, headers, body, now=1_700_000_010)
    assert not verify(SECRET, headers, body + " ", now=1_700_000_010)
    assert not verify("other-secret", headers, body, now=1_700_000_010)
    assert not verify(SECRET, headers, body, now=1_700_000_000 + 3600)  # replayed too late


def test_signature_is_hmac_sha256_over_id_dot_timestamp_dot_body() -> None:
    import base64
    import hashlib
    import hmac

    expected = hmac.new(b"k", b"msg_1.123.{}", hashlib.sha256).digest()
    assert sign("k", "msg_1", 123, "{}") == "v1," + base64.b64encode(expected).decode()
    raw = base64.b64encode(b"k").decode()
    assert sign(f"whsec_{raw}", "msg_1", 123, "{}") == sign("k", "msg_1", 123, "{}")  # Standard Webhooks secret form


def test_event_payload() -> None:
    event_id, body = build_event("ftjob-1", "failed", None, {"code": "x", "message": "boom", "param": None})
    payload = json.loads(body)
    assert payload["id"] == event_id
    assert payload["object"] == "event"
    assert payload["type"] == "fine_tuning.job.failed"
    assert isinstance(payload["created_at"], int)
    assert payload["data"] == {"id": "ftjob-1", "status": "failed", "fine_tuned_model": None,
                               "error": {"code": "x", "message": "boom", "param": None}}


def test_backoff_is_exponential_and_capped() -> None:
    assert [backoff_seconds(n) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert backoff_seconds(40) == 3600


# --- notify_terminal ----------------------------------------------------------------------------

@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[Delivery]:
    out: list[Delivery] = []
    monkeypatch.setattr(service, "send_delivery", lambda d, countdown=None: out.append(d))
    return out


def test_notify_terminal_sends_after_commit_only(db: Session, sent: list[Delivery],
                                                 project_client: tuple[Any, Project]) -> None:
    job = _job(db, project_client[1], "running")
    job.status, job.fine_tuned_model = "succeeded", "ft:tiny-lm:p::x"
    notify_terminal(db, job.id)
    assert sent == []
    db.commit()
    assert len(sent) == 1
    payload = json.loads(sent[0].body)
    assert sent[0].url == "https://example.com/h" and sent[0].attempt == 1
    assert payload["type"] == "fine_tuning.job.succeeded"
    assert payload["data"]["fine_tuned_model"] == "ft:tiny-lm:p::x"
    assert sent[0].event_id == payload["id"]


def test_notify_terminal_rolled_back_sends_nothing(db: Session, sent: list[Delivery],
                                                   project_client: tuple[Any, Project]) -> None:
    job = _job(db, project_client[1], "cancelled")
    notify_terminal(db, job.id)
    db.rollback()
    db.commit()
    assert sent == []


@pytest.mark.parametrize(("status", "url"), [("running", "https://example.com/h"), ("succeeded", None)])
def test_notify_terminal_skips(db: Session, sent: list[Delivery], project_client: tuple[Any, Project],
                               status: str, url: str | None) -> None:
    job = _job(db, project_client[1], status, webhook_url=url)
    notify_terminal(db, job.id)
    db.commit()
    assert sent == []


# --- delivery -----------------------------------------------------------------------------------

def _delivery(factory: sessionmaker[Session], url: str, status: str = "succeeded") -> Delivery:
    job_id = committed_job(factory, status=status, webhook_url=url)
    event_id, body = build_event(job_id, status, "ft:tiny-lm:worker-tests::x", None)
    return Delivery(job_id, url, event_id, body)


def test_retry_then_success_signed(committed_db: sessionmaker[Session], receiver: Receiver, secret: str,
                                   retries: list[tuple[Delivery, float | None]]) -> None:
    receiver.statuses = [500, 200]
    first = _delivery(committed_db, receiver.url)
    assert tasks.deliver_webhook(**asdict(first)).startswith("retry")
    assert len(retries) == 1
    second, countdown = retries[0]
    assert second.attempt == 2 and countdown == backoff_seconds(1)
    assert tasks.deliver_webhook(**asdict(second)) == "done"
    assert len(retries) == 1

    assert len(receiver.requests) == 2
    for headers, body in receiver.requests:
        assert body == first.body
        assert headers["webhook-id"] == first.event_id
        assert headers["content-type"] == "application/json"
        assert verify(secret, headers, body)
    events = _webhook_events(committed_db, first.job_id)
    assert [e.message for e in events] == ["Webhook attempt 1: not delivered; retrying in 10 s",
                                           "Webhook attempt 2: delivered"]
    assert [(e.data or {})["webhook"]["delivered"] for e in events] == [False, True]
    assert [e.level for e in events] == ["warn", "info"]


def test_gives_up_after_max_attempts(committed_db: sessionmaker[Session], receiver: Receiver, secret: str,
                                     retries: list[tuple[Delivery, float | None]]) -> None:
    receiver.statuses = [503, 503, 503, 503]
    delivery = _delivery(committed_db, receiver.url, status="failed")
    while True:
        if tasks.deliver_webhook(**asdict(delivery)) == "done":
            break
        delivery = retries[-1][0]
    assert len(receiver.requests) == get_settings().webhook_max_attempts == 3
    events = _webhook_events(committed_db, delivery.job_id)
    assert len(events) == 3 and "giving up" in events[-1].message


def test_gone_stops_retrying(committed_db: sessionmaker[Session], receiver: Receiver, secret: str,
                             retries: list[tuple[Delivery, float | None]]) -> None:
    receiver.statuses = [410]
    assert tasks.deliver_webhook(**asdict(_delivery(committed_db, receiver.url))) == "done"
    assert retries == []


def test_unreachable_receiver_is_retried(committed_db: sessionmaker[Session], secret: str,
                                         retries: list[tuple[Delivery, float | None]]) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    delivery = _delivery(committed_db, f"http://127.0.0.1:{port}/closed")
    assert tasks.deliver_webhook(**asdict(delivery)).startswith("retry")
    event = _webhook_events(committed_db, delivery.job_id)[0]
    assert event.message == "Webhook attempt 1: not delivered; retrying in 10 s"
    assert event.data is not None and event.data["webhook"] == {
        "event_id": delivery.event_id, "attempt": 1, "delivered": False, "retry_in_seconds": 10.0}


# --- what a tenant learns (nothing about the network) ----------------------------------------------

def _texts(events: list[JobEvent]) -> str:
    """Messages and data, less the random event id (which may hold any digits)."""
    data = [{k: v for k, v in (e.data or {})["webhook"].items() if k != "event_id"} for e in events]
    return " ".join(e.message for e in events) + json.dumps(data)


@pytest.mark.parametrize("status", [500, 404, 302])
def test_event_text_has_no_status_code(committed_db: sessionmaker[Session], receiver: Receiver, secret: str,
                                       retries: list[tuple[Delivery, float | None]], status: int) -> None:
    receiver.statuses = [status]
    delivery = _delivery(committed_db, receiver.url)
    tasks.deliver_webhook(**asdict(delivery))
    text = _texts(_webhook_events(committed_db, delivery.job_id))
    assert str(status) not in text and "HTTP" not in text and "127.0.0.1" not in text
    assert str(receiver.port) not in text


def test_unreachable_event_has_no_error_text(committed_db: sessionmaker[Session], secret: str,
                                             retries: list[tuple[Delivery, float | None]]) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    delivery = _delivery(committed_db, f"http://127.0.0.1:{port}/closed")
    tasks.deliver_webhook(**asdict(delivery))
    text = _texts(_webhook_events(committed_db, delivery.job_id))
    for leak in ("Connect", "refused", "rror", str(port), "127.0.0.1"):
        assert leak not in text


# --- delivery-time guards -----------------------------------------------------------------------

PUBLIC = "93.184.216.34"


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """The resolver's answers by name; edit it to rebind. Calls are counted under "#calls"."""
    answers: dict[str, list[str]] = {"#calls": []}

    def fake(host: str, port: int) -> list[str]:
        answers["#calls"].append(host)
        return answers[host]

    monkeypatch.setattr(urls, "resolve", fake)
    return answers


def test_rebinding_to_loopback_after_creation_is_not_sent(
        committed_db: sessionmaker[Session], receiver: Receiver, secret: str, dns: dict[str, list[str]],
        monkeypatch: pytest.MonkeyPatch, retries: list[tuple[Delivery, float | None]]) -> None:
    monkeypatch.setattr(get_settings(), "webhook_allowed_hosts", [])  # the receiver is internal now
    url = f"http://hooks.example.com:{receiver.port}/h"
    dns["hooks.example.com"] = [PUBLIC]
    service.validate_webhook_url(url)  # what job creation checks: accepted
    dns["hooks.example.com"] = ["127.0.0.1"]  # the attacker's DNS answers differently later
    delivery = _delivery(committed_db, url)
    assert tasks.deliver_webhook(**asdict(delivery)) == "done"
    assert receiver.requests == [] and retries == []
    events = _webhook_events(committed_db, delivery.job_id)
    assert [e.message for e in events] == ["Webhook attempt 1: not delivered; giving up"]
    assert "127.0.0.1" not in _texts(events)


def test_delivery_connects_to_the_checked_address(committed_db: sessionmaker[Session], receiver: Receiver,
                                                  secret: str, dns: dict[str, list[str]]) -> None:
    """The name is resolved once, by the check; the request goes to that address (this machine
    has no DNS for the name) and carries the name in Host."""
    dns["hooks.example.com"] = ["127.0.0.1"]
    delivery = _delivery(committed_db, f"http://hooks.example.com:{receiver.port}/h")
    assert tasks.deliver_webhook(**asdict(delivery)) == "done"
    assert dns["#calls"] == ["hooks.example.com"]
    assert receiver.requests[0][0]["host"] == f"hooks.example.com:{receiver.port}"


def test_https_is_pinned_with_sni(monkeypatch: pytest.MonkeyPatch, secret: str, dns: dict[str, list[str]]) -> None:
    dns["hooks.example.com"] = [PUBLIC]
    seen: list[httpx.Request] = []

    def send(self: httpx.Client, request: httpx.Request, **kw: Any) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204, request=request)

    monkeypatch.setattr(httpx.Client, "send", send)
    monkeypatch.setattr(service, "_record", lambda *a: None)
    assert service.deliver(Delivery("ftjob-1", "https://hooks.example.com/h?x=1", "whevt-1", "{}")) is None
    (request,) = seen
    assert str(request.url) == f"https://{PUBLIC}/h?x=1"
    assert request.headers["host"] == "hooks.example.com"
    assert request.extensions["sni_hostname"] == "hooks.example.com"
    assert verify(SECRET, request.headers, "{}")


def test_redirect_is_not_followed(committed_db: sessionmaker[Session], receiver: Receiver, internal: Receiver,
                                  secret: str, retries: list[tuple[Delivery, float | None]]) -> None:
    receiver.statuses, receiver.location = [302], internal.url
    delivery = _delivery(committed_db, receiver.url)
    assert tasks.deliver_webhook(**asdict(delivery)).startswith("retry")
    assert len(receiver.requests) == 1 and internal.requests == []
    assert _webhook_events(committed_db, delivery.job_id)[0].data["webhook"]["delivered"] is False  # type: ignore[index]


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/h\r\nx-injected: 1", "https://127.0.0.1:{port}/h"])
def test_stored_url_refused_at_delivery(committed_db: sessionmaker[Session], receiver: Receiver, secret: str,
                                        monkeypatch: pytest.MonkeyPatch, url: str,
                                        retries: list[tuple[Delivery, float | None]]) -> None:
    """Rows written before the checks (or an allowlist since narrowed) are re-checked."""
    monkeypatch.setattr(get_settings(), "webhook_allowed_hosts", [])
    delivery = _delivery(committed_db, url.format(port=receiver.port))
    assert tasks.deliver_webhook(**asdict(delivery)) == "done"
    assert receiver.requests == [] and retries == []


def test_no_secret_no_unsigned_send(committed_db: sessionmaker[Session], receiver: Receiver, secret: str,
                                    monkeypatch: pytest.MonkeyPatch,
                                    retries: list[tuple[Delivery, float | None]]) -> None:
    monkeypatch.setattr(get_settings(), "webhook_secret", "")
    delivery = _delivery(committed_db, receiver.url)
    assert tasks.deliver_webhook(**asdict(delivery)) == "done"
    assert receiver.requests == []
    assert _webhook_events(committed_db, delivery.job_id)[0].message == "Webhook attempt 1: not delivered; giving up"


def test_task_is_registered() -> None:
    from app.kit.broker import get_celery

    assert service.TASK_NAME in get_celery().tasks
    assert tasks.deliver_webhook.name == "tunehouse.deliver_webhook"


def test_send_delivery_targets_the_default_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.kit.broker import get_celery

    calls: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(get_celery(), "send_task", lambda name, **kw: calls.append((name, kw)))
    delivery = Delivery("ftjob-1", "https://example.com/h", "whevt-1", "{}", attempt=2)
    service.send_delivery(delivery, countdown=20)
    assert calls == [("tunehouse.deliver_webhook",
                      {"kwargs": asdict(delivery), "queue": "default", "countdown": 20})]
