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
checkpoint info plus an `export` section), never `training_state/`.

Files as stored (adapters, full / freeze models) stream right away. A LoRA's merged model takes model
work, which the API never does (it never imports torch): a worker builds it once per checkpoint
(`app.jobs.exports`, cached in storage at `jobs/<id>/exports/<checkpoint>-merged`); until it is ready
the endpoint answers 202 with the export's status and a Retry-After.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from sqlalchemy.orm import Session

from app.jobs import exports
from app.jobs.schemas import ExportOut
from app.jobs.service import get_job
from app.kit.errors import InvalidRequest, NotFound
from app.kit.storage import Storage
from app.models_registry import repository
from app.orm import Project
from ml.checkpoint import INFO_FILE, NOT_EXPORTED, adapter_kind, is_adapter_dir

ExportFormat = Literal["adapter", "merged", "full"]
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
        model = repository.model_of_job(session, job.id)  # `job` is already the caller's
        if model is None:
            raise NotFound(f"Job {job.id} has no final model (status {job.status}).", param="checkpoint_id",
                           code="checkpoint_not_found")
        return Source(job.id, "final", model.storage_key, model.id)
    ckpt = repository.job_checkpoint(session, project.id, job.id, checkpoint_id)
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


def _choose(ckpt: Path, label: str, fmt: ExportFormat | None) -> tuple[ExportFormat, bool]:
    """(format, whether it takes merging a LoRA); a format the checkpoint can't give is a 400."""
    adapter = adapter_kind(ckpt) if is_adapter_dir(ckpt) else None
    kind = _read_json(ckpt / INFO_FILE).get("training_type", "full")
    fmt = fmt or ("adapter" if adapter else "full")
    if fmt == "adapter" and adapter is None:
        raise InvalidRequest(f"Checkpoint {label} is a {kind} fine-tune: it has no adapter. "
                             "Download format=full.", param="format", code="invalid_format")
    if fmt == "adapter" or adapter is None:
        return fmt, False
    if adapter != "LORA":
        raise InvalidRequest(f"Checkpoint {label} is a {kind} adapter: prompt tuning learns virtual "
                             "tokens prepended to every input, which no weight of the base model can hold, "
                             "so it cannot be merged. Download format=adapter and load it with peft.",
                             param="format", code="invalid_format")
    return fmt, True


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
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not (set(p.relative_to(root).parts) & NOT_EXPORTED) and p.name != INFO_FILE)


def _export_info(directory: Path, source: Source, fmt: ExportFormat) -> bytes:
    info = _read_json(directory / INFO_FILE)
    info["export"] = {"format": fmt, "job_id": source.job_id, "checkpoint": source.label,
                      "fine_tuned_model": source.fine_tuned_model, "base_model": info.get("base_model"),
                      "merged": fmt != "adapter" and info.get("training_type") in ("lora", "qlora")}
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
                     fmt: ExportFormat | None) -> TarExport | ExportOut:
    """The tar to stream, or the merged export being built (the caller answers 202)."""
    source = resolve_source(session, project, job_id, checkpoint_id)
    ckpt = _local_dir(storage, source.storage_key)
    chosen, merge = _choose(ckpt, source.label, fmt)
    if not merge:
        return build_tar(ckpt, source, chosen)
    merged = exports.merged_export(session, storage, project_id=project.id, job_id=source.job_id,
                                   checkpoint=source.label, source_key=source.storage_key, ckpt=ckpt)
    if isinstance(merged, Path):
        return build_tar(merged, source, chosen)
    return exports.export_out(merged, chosen)
