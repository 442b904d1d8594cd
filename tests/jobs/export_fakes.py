"""A fake LoRA final model and a stub export build, importable without pytest's conftest (the
no-torch subprocess test uses them too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.auth.service import get_or_create_project
from app.jobs import exports
from app.kit import ids
from app.kit.db import utcnow
from app.kit.storage import get_storage
from app.orm import FineTunedModel, Job
from ml.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, INFO_FILE, CheckpointInfo, write_info
from ml.config import Task, TrainingKind
from tests.jobs.factories import make_file


def fake_lora_final(session: Session, project_name: str) -> str:
    """A succeeded LoRA job whose final model is an adapter-shaped directory (no real weights)."""
    project = get_or_create_project(session, project_name)
    file = make_file(session, project, "classification", rows=4)
    job = Job(id=ids.job_id(), project_id=project.id, model="tiny-lm", training_file=file.id, seed=1,
              task="classification", training_type={"type": "lora"}, hyperparameters={}, config={},
              status="succeeded", finished_at=utcnow())
    session.add(job)
    session.flush()
    key = f"jobs/{job.id}/final"
    session.add(FineTunedModel(id=f"ft:tiny-lm:{project_name}::{job.id}", project_id=project.id, job_id=job.id,
                               base_model="tiny-lm", task="classification", training_type="lora",
                               storage_key=key))
    ckpt = get_storage().local_dir(key)
    write_info(ckpt, CheckpointInfo(task=Task.classification, training_type=TrainingKind.lora, base_model="tiny-lm",
                                    step=1, epoch=1.0, label_names=["a", "b"]))
    (ckpt / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA"}))
    (ckpt / ADAPTER_WEIGHTS).write_bytes(b"adapter v1")
    session.commit()
    return job.id


def fake_build(storage: Any, claim: exports.Claim) -> tuple[str, str]:
    """What `_build` records, without the merge: the checkpoint's info file and a weights file."""
    ckpt = storage.local_dir(claim.source_key)
    tmp = Path(storage.staging_dir()) / f"fake-{claim.export_id}-{claim.attempt}"
    tmp.mkdir()
    (tmp / INFO_FILE).write_bytes((ckpt / INFO_FILE).read_bytes())
    (tmp / "model.safetensors").write_bytes(b"merged weights")
    key = exports.storage_key(claim.job_id, claim.checkpoint)
    storage.put_dir(key, tmp)
    return key, exports.fingerprint(ckpt)
