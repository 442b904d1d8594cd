"""Keyset pagination (`app.kit.pagination`) over deep pages: walking every page with `after` yields each
row once, in (order column, id) order, with ties on the order column broken by id; pages are scoped by
their query; queue positions of a listed page are those counted one job at a time."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth.service import get_or_create_project
from app.jobs import service
from app.jobs.events import add_event
from app.kit import ids
from app.kit.db import utcnow
from app.kit.errors import InvalidRequest
from app.kit.pagination import paginate
from app.orm import File, Job, JobEvent, Project


def _jobs(db: Session, project: Project, n: int, ties: int = 4) -> list[Job]:
    """`n` jobs whose created_at repeat in runs of `ties` (ordering must fall back to id)."""
    file = File(id=ids.file_id(), project_id=project.id, purpose="fine-tune", filename="t.jsonl",
                storage_key="files/none")
    db.add(file)
    db.flush()
    base = utcnow()
    jobs = [Job(id=ids.job_id(), project_id=project.id, model="minilm-l6", training_file=file.id, seed=0,
                task="classification", training_type={"type": "lora"}, hyperparameters={}, config={},
                status="queued" if i % 3 == 0 else "succeeded", created_at=base + timedelta(seconds=i // ties))
            for i in range(n)]
    db.add_all(jobs)
    db.flush()
    return jobs


def _walk(db: Session, stmt: Any, model: Any, col: Any, limit: int, **kw: Any) -> list[str]:
    seen: list[str] = []
    after = None
    while True:
        rows, more = paginate(db, stmt, model, after, limit, col, **kw)
        seen += [r.id for r in rows]
        if not more:
            return seen
        after = rows[-1].id


@pytest.mark.parametrize("descending", [True, False])
def test_deep_job_pages_break_ties_by_id(db: Session, descending: bool) -> None:
    project = get_or_create_project(db, "pages")
    jobs = _jobs(db, project, 103)
    _jobs(db, get_or_create_project(db, "pages-noise"), 20)  # another project's rows never show
    expected = [j.id for j in sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=descending)]
    stmt = select(Job).where(Job.project_id == project.id)
    for limit in (1, 7, 100):
        assert _walk(db, stmt, Job, Job.created_at, limit, descending=descending) == expected


def test_deep_event_pages_on_seq(db: Session) -> None:
    project = get_or_create_project(db, "pages-events")
    job = _jobs(db, project, 1)[0]
    events = [add_event(db, job.id, f"e{i}") for i in range(60)]
    stmt = select(JobEvent).where(JobEvent.job_id == job.id)
    walked = _walk(db, stmt, JobEvent, JobEvent.seq, 7, unique_order=True, max_limit=1000)
    assert walked == [e.id for e in reversed(events)]
    rows, more = service.list_events(db, project, job.id, events[10].id, 1000)
    assert [e.id for e in rows] == [e.id for e in reversed(events[:10])] and not more


def test_after_must_be_visible_to_the_query(db: Session) -> None:
    mine = _jobs(db, get_or_create_project(db, "pages-mine"), 3)
    theirs = _jobs(db, get_or_create_project(db, "pages-theirs"), 3)
    stmt = select(Job).where(Job.project_id == mine[0].project_id)
    with pytest.raises(InvalidRequest) as err:
        paginate(db, stmt, Job, theirs[0].id, 2, Job.created_at)
    assert err.value.param == "after"


def test_queue_positions_of_a_page_match_one_by_one(db: Session) -> None:
    jobs = _jobs(db, get_or_create_project(db, "pages-queue"), 30, ties=1)
    positions = service.queue_positions(db, jobs)
    assert positions == {j.id: service.queue_position(db, j) for j in jobs if j.status == "queued"}
    assert len(positions) == 10 and service.queue_positions(db, []) == {}
