"""Model and checkpoint lookup: the one owner of fine-tuned model names
(`ft:<base>:<project>:<suffix>:<job id>`, checkpoints `<model>:ckpt-step-<N>`) and of the queries
that find registry and checkpoint rows, always scoped to a project where a caller names them.
A deleted model is a row with `deleted_at` set: "live" queries skip it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, or_, select
from sqlalchemy.orm import Session

from app.orm import Checkpoint, FineTunedModel

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class FtName:
    base: str
    project: str
    suffix: str
    job_id: str


def ft_name(base: str, project_name: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{base}:{_UNSAFE.sub('-', project_name)}:{suffix or ''}:{job_id}"


def parse_ft_name(name: str) -> FtName | None:
    """The parts of an `ft:` name, or None for anything else. The base may itself contain ':'."""
    if not name.startswith("ft:"):
        return None
    parts = name[3:].rsplit(":", 3)
    if len(parts) != 4 or not parts[0] or not parts[3]:
        return None
    return FtName(*parts)


def checkpoint_name(model_name: str, step: int) -> str:
    return f"{model_name}:ckpt-step-{step}"


# --- registry rows ----------------------------------------------------------------------------

def model_row(session: Session, project_id: str, model_id: str) -> FineTunedModel | None:
    """The registry row for `model_id` in this project, deleted or not."""
    return session.scalar(select(FineTunedModel).where(FineTunedModel.id == model_id,
                                                       FineTunedModel.project_id == project_id))


def live_model(session: Session, project_id: str, model_id: str) -> FineTunedModel | None:
    row = model_row(session, project_id, model_id)
    return row if row is not None and row.deleted_at is None else None


def live_models_stmt(project_id: str) -> Select[Any]:
    return select(FineTunedModel).where(FineTunedModel.project_id == project_id, FineTunedModel.deleted_at.is_(None))


def live_models(session: Session, project_id: str) -> list[FineTunedModel]:
    return list(session.scalars(live_models_stmt(project_id).order_by(FineTunedModel.created_at.desc())))


def model_of_job(session: Session, job_id: str, *, deleted: bool = False) -> FineTunedModel | None:
    """The job's model: the live one, or with `deleted=True` the deleted one."""
    cond = FineTunedModel.deleted_at.is_not(None) if deleted else FineTunedModel.deleted_at.is_(None)
    return session.scalar(select(FineTunedModel).where(FineTunedModel.job_id == job_id, cond).limit(1))


# --- checkpoints --------------------------------------------------------------------------------

def checkpoint_by_ref(session: Session, project_id: str, ref: str) -> Checkpoint | None:
    """A checkpoint of this project by id (`ftckpt-...`) or name (`ft:...:ckpt-step-N`)."""
    return session.scalar(select(Checkpoint).where(
        Checkpoint.project_id == project_id,
        or_(Checkpoint.id == ref, Checkpoint.fine_tuned_model_checkpoint == ref)).limit(1))


def job_checkpoint(session: Session, project_id: str, job_id: str, checkpoint_id: str) -> Checkpoint | None:
    return session.scalar(select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.job_id == job_id,
                                                   Checkpoint.project_id == project_id))


def checkpoint_at(session: Session, job_id: str, step: int) -> Checkpoint | None:
    return session.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step))


def latest_checkpoint(session: Session, job_id: str) -> Checkpoint | None:
    return session.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id)
                          .order_by(Checkpoint.step.desc()).limit(1))


def best_checkpoint(session: Session, job_id: str) -> Checkpoint | None:
    return session.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.is_best).limit(1))


def job_checkpoints(session: Session, job_id: str) -> list[Checkpoint]:
    """Newest first."""
    return list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)
                                .order_by(Checkpoint.step.desc())))


def checkpoints_query(project_id: str, job_id: str) -> Select[Any]:
    """For pagination: the job's checkpoints in this project."""
    return select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.project_id == project_id)
