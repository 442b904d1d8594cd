"""`resources` on job creation: stored in the config, echoed on the job, refused with a clear 400 when
no worker could ever run it (README "Distributed training")."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.orm import Project
from app.settings import get_settings
from tests.jobs.factories import make_file


@pytest.fixture
def chat_file(db: Session, project_client: tuple[TestClient, Project]) -> str:
    return make_file(db, project_client[1], "chat", rows=40).id


def test_resources_default_to_one_device_and_are_echoed(client: TestClient, chat_file: str) -> None:
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-lm", "training_file": chat_file})
    assert r.status_code == 200, r.text
    assert r.json()["resources"] == {"devices": 1, "nodes": 1, "strategy": "auto"}

    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-lm", "training_file": chat_file,
                                                  "resources": {"devices": 2, "strategy": "ddp"}})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["resources"] == {"devices": 2, "nodes": 1, "strategy": "ddp"}
    assert job["config"]["resources"]["devices"] == 2
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["resources"]["devices"] == 2


@pytest.mark.parametrize(("resources", "extra", "param"), [
    ({"devices": 0}, {}, "resources.devices"),
    ({"devices": 3}, {}, "resources.devices"),  # more than TUNEHOUSE_WORKER_DEVICES (2)
    ({"nodes": 9}, {}, "resources.nodes"),  # more than TUNEHOUSE_MAX_NODES (8)
    ({"strategy": "fsdp"}, {"training_type": "lora"}, "resources.strategy"),  # fsdp shards full fine-tunes
    ({"strategy": "fsdp"}, {"training_type": "full", "precision": "fp16"}, "precision"),
    ({"strategy": "zero3"}, {}, "resources.strategy"),
    ({"gpus": 2}, {}, "resources.gpus"),
    ({"devices": 2}, {"training_type": "qlora"}, "resources.devices"),
])
def test_resources_no_worker_can_satisfy_are_clear_400s(
    client: TestClient, chat_file: str, resources: dict[str, Any], extra: dict[str, Any], param: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(get_settings(), "worker_devices", 2)
    body = {"model": "tiny-lm", "training_file": chat_file, "resources": resources, **extra}
    r = client.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["message"] and err["type"] == "invalid_request_error"


@pytest.mark.parametrize(("strategy", "extra"), [("fsdp", {"training_type": "full"}), ("ddp", {"packing": True})])
def test_fsdp_full_and_ddp_packing_are_accepted(client: TestClient, chat_file: str, strategy: str,
                                                extra: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "worker_devices", 2)
    body = {"model": "tiny-lm", "training_file": chat_file, "resources": {"devices": 2, "strategy": strategy},
            **extra}
    r = client.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["resources"] == {"devices": 2, "nodes": 1, "strategy": strategy}
