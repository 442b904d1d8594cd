"""Weights download: `GET /v1/fine_tuning/jobs/{job}/checkpoints/{checkpoint|final}/download?format=`.

Formats:
  adapter  the peft adapter as trained (adapter_config.json + adapter_model.safetensors, task head
           included via modules_to_save); only for lora / prompt_tuning checkpoints
  merged   LoRA merged into its base (`merge_and_unload`): a plain `transformers` model directory.
           Prompt tuning cannot be merged. For full / freeze checkpoints: the model itself.
  full     the whole model: the checkpoint itself for full / freeze, the merged model for LoRA
  (none)   as trained: adapter for adapters, full otherwise

The archive is an uncompressed tar (weights don't compress) streamed with a known Content-Length:
`<job>-<checkpoint>-<format>/` holding safetensors + config + tokenizer files + tunehouse.json (the
checkpoint info plus an `export` section), never `training_state/`. Merged models are built once per
checkpoint and cached in storage (`jobs/<id>/exports/<checkpoint>-merged`, put atomically).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.jobs.service import get_job
from app.kit.errors import InvalidRequest, NotFound
from app.kit.storage import Storage
from app.orm import Checkpoint, FineTunedModel, Project

ExportFormat = Literal["adapter", "merged", "full"]
INFO_FILE = "tunehouse.json"
SKIP = {"training_state", "_COMPLETE", "README.md"}
CHUNK = 1 << 20
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE


@dataclass
class Source:
    job_id: str
    label: str  # "final" or the checkpoint id
    storage_key: str
    fine_tuned_model: str | None


def resolve_source(session: Session, project: Project, job_id: str, checkpoint_id: str) -> Source:
    """The stored checkpoint to export; anything outside the caller's project answers 404."""
    job = get_job(session, project, job_id)
    if checkpoint_id == "final":
        model = session.scalar(select(FineTunedModel).where(
            FineTunedModel.job_id == job.id, FineTunedModel.project_id == project.id,
            FineTunedModel.deleted_at.is_(None)))
        if model is None:
            raise NotFound(f"Job {job.id} has no final model (status {job.status}).", param="checkpoint_id",
                           code="checkpoint_not_found")
        return Source(job.id, "final", model.storage_key, model.id)
    ckpt = session.scalar(select(Checkpoint).where(
        Checkpoint.id == checkpoint_id, Checkpoint.job_id == job.id, Checkpoint.project_id == project.id))
    if ckpt is None:
        raise NotFound(f"No checkpoint '{checkpoint_id}' in job {job.id}.", param="checkpoint_id",
                       code="checkpoint_not_found")
    return Source(job.id, ckpt.id, ckpt.storage_key, ckpt.fine_tuned_model_checkpoint)


# --- building the directory to export -------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def _local_dir(storage: Storage, key: str) -> Path:
    try:
        path = storage.local_dir(key)
    except FileNotFoundError:
        path = None
    if path is None or not (path / INFO_FILE).exists():
        raise NotFound("The checkpoint's files are no longer stored.", param="checkpoint_id",
                       code="checkpoint_not_found")
    return path


def _adapter_type(ckpt: Path) -> str | None:
    cfg = ckpt / "adapter_config.json"
    return str(_read_json(cfg).get("peft_type", "")) if cfg.exists() else None


def _fingerprint(ckpt: Path) -> str:
    """Identifies the adapter a merged export was made from (a re-saved checkpoint invalidates it)."""
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with open(ckpt / name, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _merge_into(ckpt: Path, base_dir: Path, out: Path) -> None:
    from ml.checkpoint import read_info
    from ml.modeling import load_adapter, load_task_model, load_tokenizer, quiet_transformers

    info = read_info(ckpt)
    tok = load_tokenizer(ckpt)
    base = load_task_model(info.task, base_dir, tok, info.label_names)
    merged = load_adapter(base, ckpt, trainable=False).merge_and_unload()
    with quiet_transformers():  # transformers 5 writes safetensors only (safe_serialization is gone)
        merged.save_pretrained(str(out))
        tok.save_pretrained(str(out))


def _base_dir(storage: Storage, ckpt: Path) -> Path:
    from app.models_registry.catalog import base_model_path, get_spec

    info = _read_json(ckpt / INFO_FILE)
    if info.get("base_checkpoint_key"):  # an adapter trained on a from_checkpoint full model
        return storage.local_dir(str(info["base_checkpoint_key"]))
    return base_model_path(get_spec(str(info["base_model"])))


def merged_dir(storage: Storage, source: Source, ckpt: Path) -> Path:
    """The LoRA checkpoint merged into its base, built once and cached in storage."""
    key = f"jobs/{source.job_id}/exports/{source.label}-merged"
    fingerprint = _fingerprint(ckpt)
    try:
        cached = storage.local_dir(key)
        if (cached / INFO_FILE).exists() and _read_json(cached / INFO_FILE).get("source") == fingerprint:
            return cached
    except FileNotFoundError:
        pass
    tmp = Path(tempfile.mkdtemp(prefix="merge-", dir=storage.staging_dir()))
    try:
        _merge_into(ckpt, _base_dir(storage, ckpt), tmp)
        info = _read_json(ckpt / INFO_FILE)
        (tmp / INFO_FILE).write_text(json.dumps({**info, "source": fingerprint}, indent=2))
        storage.put_dir(key, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return storage.local_dir(key)


def export_dir(storage: Storage, source: Source, fmt: ExportFormat | None) -> tuple[Path, ExportFormat]:
    ckpt = _local_dir(storage, source.storage_key)
    adapter = _adapter_type(ckpt)
    kind = _read_json(ckpt / INFO_FILE).get("training_type", "full")
    fmt = fmt or ("adapter" if adapter else "full")
    if fmt == "adapter":
        if adapter is None:
            raise InvalidRequest(f"Checkpoint {source.label} is a {kind} fine-tune: it has no adapter. "
                                 "Download format=full.", param="format", code="invalid_format")
        return ckpt, fmt
    if adapter is None:
        return ckpt, fmt
    if adapter != "LORA":
        raise InvalidRequest(f"Checkpoint {source.label} is a {kind} adapter: prompt tuning learns virtual "
                             "tokens prepended to every input, which no weight of the base model can hold, "
                             "so it cannot be merged. Download format=adapter and load it with peft.",
                             param="format", code="invalid_format")
    return merged_dir(storage, source, ckpt), fmt


# --- the tar stream -------------------------------------------------------------------------------

@dataclass
class Member:
    info: tarfile.TarInfo
    fh: IO[bytes] | None = None  # opened up front: a concurrent cache swap can't pull files away
    data: bytes = b""

    def header(self) -> bytes:
        return self.info.tobuf(format=tarfile.PAX_FORMAT)

    def size(self) -> int:
        return len(self.header()) + self.info.size + _pad(self.info.size)


@dataclass
class TarExport:
    filename: str
    members: list[Member] = field(default_factory=list)

    def content_length(self) -> int:
        body = sum(m.size() for m in self.members) + 2 * BLOCK
        return body + _pad(body, RECORD)

    def stream(self) -> Iterator[bytes]:
        try:
            for m in self.members:
                yield m.header()
                yield from _member_bytes(m)
                yield b"\0" * _pad(m.info.size)
            body = sum(m.size() for m in self.members) + 2 * BLOCK
            yield b"\0" * (2 * BLOCK + _pad(body, RECORD))
        finally:
            self.close()

    def close(self) -> None:
        for m in self.members:
            if m.fh is not None:
                m.fh.close()


def _pad(size: int, unit: int = BLOCK) -> int:
    return (unit - size % unit) % unit


def _member_bytes(m: Member) -> Iterator[bytes]:
    if m.fh is None:
        yield m.data
        return
    left = m.info.size
    while left > 0:
        chunk = m.fh.read(min(CHUNK, left))
        if not chunk:
            raise OSError(f"{m.info.name} shrank while it was being sent")
        left -= len(chunk)
        yield chunk


def _tarinfo(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = size, int(mtime), 0o644, tarfile.REGTYPE
    return info


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not (set(p.relative_to(root).parts) & SKIP)
                  and p.name != INFO_FILE)


def _export_info(directory: Path, source: Source, fmt: ExportFormat) -> bytes:
    info = _read_json(directory / INFO_FILE)
    info.pop("source", None)
    info["export"] = {"format": fmt, "job_id": source.job_id, "checkpoint": source.label,
                      "fine_tuned_model": source.fine_tuned_model, "base_model": info.get("base_model"),
                      "merged": fmt != "adapter" and info.get("training_type") == "lora"}
    return json.dumps(info, indent=2).encode()


def build_tar(directory: Path, source: Source, fmt: ExportFormat) -> TarExport:
    prefix = f"{source.job_id}-{source.label}-{fmt}"
    export = TarExport(f"{prefix}.tar")
    try:
        for path in _files(directory):
            fh = open(path, "rb")  # noqa: SIM115 -- closed by TarExport.stream / close
            st = os.fstat(fh.fileno())  # the file we send, even if the path is swapped meanwhile
            name = f"{prefix}/{path.relative_to(directory).as_posix()}"
            export.members.append(Member(_tarinfo(name, st.st_size, st.st_mtime), fh))
        data = _export_info(directory, source, fmt)
        export.members.append(Member(_tarinfo(f"{prefix}/{INFO_FILE}", len(data), time.time()), data=data))
    except BaseException:
        export.close()
        raise
    return export


def prepare_download(session: Session, project: Project, storage: Storage, job_id: str, checkpoint_id: str,
                     fmt: ExportFormat | None) -> TarExport:
    source = resolve_source(session, project, job_id, checkpoint_id)
    session.rollback()  # nothing to write: release the connection while a merge may take a while
    directory, chosen = export_dir(storage, source, fmt)
    return build_tar(directory, source, chosen)
