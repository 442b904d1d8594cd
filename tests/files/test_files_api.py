"""Retrieve, list (cursor pagination), download, delete, and project isolation."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.files.service import get_file
from app.kit.db import utcnow
from app.kit.errors import NotFound
from app.kit.storage import get_storage
from app.orm import File, Job, Project

from . import error_of, jsonl, upload


def _make(client: TestClient, n: int, db: Session) -> list[str]:
    """n files with distinct, increasing created_at (oldest first)."""
    ids = [upload(client, f"f{i}.jsonl", jsonl({"text": str(i)})).json()["id"] for i in range(n)]
    base = utcnow() - timedelta(hours=1)
    for i, fid in enumerate(ids):
        row = db.get(File, fid)
        assert row is not None
        row.created_at = base + timedelta(seconds=i)
    db.commit()
    return ids


def test_retrieve(client: TestClient) -> None:
    created = upload(client, "a.jsonl", jsonl({"text": "x"})).json()
    r = client.get(f"/v1/files/{created['id']}")
    assert r.status_code == 200 and r.json() == created


def test_content_round_trips_bytes(client: TestClient) -> None:
    data = b"\xef\xbb\xbf" + jsonl({"text": "caf\u00e9 \u2615"}).replace(b"\n", b"\r\n") * 3000 + b"\n\n"
    fid = upload(client, "a.jsonl", data).json()["id"]
    r = client.get(f"/v1/files/{fid}/content")
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-type"].startswith("application/jsonl")
    assert "a.jsonl" in r.headers["content-disposition"]
    csv_id = upload(client, "b.csv", b"text\nx\n").json()["id"]
    r = client.get(f"/v1/files/{csv_id}/content")
    assert r.content == b"text\nx\n" and r.headers["content-type"].startswith("text/csv")


def test_content_streams_large_file(client: TestClient) -> None:
    data = jsonl(*({"text": "y" * 100 + str(i)} for i in range(30_000)))  # ~3.5 MB: several chunks
    fid = upload(client, "big.jsonl", data).json()["id"]
    with client.stream("GET", f"/v1/files/{fid}/content") as r:
        h = hashlib.sha256()
        for chunk in r.iter_bytes():
            h.update(chunk)
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("order", ["desc", "asc"])
def test_list_pagination(client: TestClient, db: Session, order: str) -> None:
    ids = _make(client, 5, db)
    expected = list(reversed(ids)) if order == "desc" else ids
    seen: list[str] = []
    after: str | None = None
    for _ in range(3):
        params: dict[str, str | int] = {"limit": 2, "order": order, **({"after": after} if after else {})}
        page = client.get("/v1/files", params=params).json()
        assert page["object"] == "list"
        seen += [f["id"] for f in page["data"]]
        assert page["first_id"] == page["data"][0]["id"] and page["last_id"] == page["data"][-1]["id"]
        after = page["last_id"]
        if not page["has_more"]:
            break
    assert seen == expected and not page["has_more"]


def test_list_defaults_and_filters(client: TestClient, db: Session) -> None:
    ids = _make(client, 3, db)
    page = client.get("/v1/files").json()
    assert [f["id"] for f in page["data"]] == list(reversed(ids)) and page["has_more"] is False
    assert client.get("/v1/files", params={"purpose": "fine-tune-results"}).json()["data"] == []
    assert len(client.get("/v1/files", params={"purpose": "fine-tune"}).json()["data"]) == 3
    assert client.get("/v1/files", params={"limit": 10_000}).status_code == 200


BAD_PARAMS = [({"limit": 0}, "limit"), ({"limit": 10_001}, "limit"), ({"order": "sideways"}, "order"),
              ({"after": "file-nope"}, "after")]


@pytest.mark.parametrize(("params", "param"), BAD_PARAMS)
def test_list_bad_params(client: TestClient, params: dict[str, str | int], param: str) -> None:
    r = client.get("/v1/files", params=params)
    assert r.status_code == 400 and error_of(r)["param"] == param


def test_empty_list(client: TestClient) -> None:
    page = client.get("/v1/files").json()
    assert page == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}


def test_delete(client: TestClient, db: Session) -> None:
    fid = upload(client, "a.jsonl", jsonl({"text": "x"})).json()["id"]
    key = db.get(File, fid).storage_key  # type: ignore[union-attr]
    r = client.delete(f"/v1/files/{fid}")
    assert r.status_code == 200 and r.json() == {"id": fid, "object": "file", "deleted": True}
    db.expire_all()
    row = db.get(File, fid)
    assert row is not None and row.status == "deleted" and row.deleted_at is not None
    assert not get_storage().exists(key)
    for method, path in [("GET", f"/v1/files/{fid}"), ("GET", f"/v1/files/{fid}/content"),
                         ("DELETE", f"/v1/files/{fid}")]:
        r = client.request(method, path)
        assert r.status_code == 404 and error_of(r)["param"] == "file_id"
    assert client.get("/v1/files").json()["data"] == []


def _job(db: Session, project: Project, file_id: str, status: str) -> Job:
    job = Job(id=f"ftjob-{status}", project_id=project.id, model="m", training_file=file_id, seed=1,
              task="causal_lm", training_type={"type": "lora"}, hyperparameters={}, status=status)
    db.add(job)
    db.commit()
    return job


def test_delete_in_use_conflicts(project_client: tuple[TestClient, Project], db: Session) -> None:
    client, project = project_client
    fid = upload(client, "a.jsonl", jsonl({"text": "x"})).json()["id"]
    job = _job(db, project, fid, "running")
    r = client.delete(f"/v1/files/{fid}")
    assert r.status_code == 409 and error_of(r)["code"] == "file_in_use" and job.id in error_of(r)["message"]
    assert client.get(f"/v1/files/{fid}/content").status_code == 200
    job.status = "succeeded"
    db.commit()
    assert client.delete(f"/v1/files/{fid}").status_code == 200


def test_other_project_sees_404(client: TestClient, other_client: TestClient) -> None:
    fid = upload(client, "a.jsonl", jsonl({"text": "x"})).json()["id"]
    for method, path in [("GET", f"/v1/files/{fid}"), ("GET", f"/v1/files/{fid}/content"),
                         ("DELETE", f"/v1/files/{fid}")]:
        r = other_client.request(method, path)
        assert r.status_code == 404, (method, path)
        assert (error_of(r)["code"], error_of(r)["param"]) == ("file_not_found", "file_id")
    assert other_client.get("/v1/files").json()["data"] == []
    assert other_client.get("/v1/files", params={"after": fid}).status_code == 400
    assert client.get(f"/v1/files/{fid}").status_code == 200  # untouched


def test_get_file_for_jobs(project_client: tuple[TestClient, Project], db: Session) -> None:
    client, project = project_client
    fid = upload(client, "a.jsonl", jsonl({"text": "x"})).json()["id"]
    assert get_file(db, project.id, fid, "training_file").id == fid
    assert get_file(db, project.id, fid, "training_file", lock="share").id == fid
    with pytest.raises(NotFound) as exc:
        get_file(db, "proj-other", fid, "validation_file")
    assert exc.value.param == "validation_file" and exc.value.status_code == 404
