"""`POST /v1/files/{id}/clean`: a cleaned, validated copy of a stored fine-tune file (the rules are in
`ml.data.cleaning`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.orm import Session

from app.files.service import InvalidFileFormat, get_file, store_file
from app.kit.errors import InvalidRequest, NotFound
from app.kit.storage import Storage, staged_file
from app.orm import File
from app.settings import get_settings
from app.tenancy.service import check_storage_quota
from ml.data.cleaning import Cleaner, CleaningOptions, CleaningReport
from ml.data.formats import iter_records, validate_file


def _token_counter(options: CleaningOptions) -> Callable[[str], int] | None:
    if options.max_tokens is None:
        return None
    if not options.model:
        raise InvalidRequest("max_tokens needs 'model': the base model whose tokenizer counts tokens.",
                             param="model")
    from app.jobs.estimate import base_tokenizer

    model = options.model
    base_tokenizer(model)  # an unknown model fails here, before any row is read
    # The calling thread's own tokenizer on every call: instances are never shared across threads.
    return lambda text: len(base_tokenizer(model)(text, add_special_tokens=False)["input_ids"])


def _write_cleaned(src: Path, kind: str, out: Path, cleaner: Cleaner) -> None:
    with open(out, "w", encoding="utf-8") as fh:
        for rec in iter_records(src, kind):
            kept = cleaner.process(rec)
            if kept is not None:
                fh.write(json.dumps(kept, ensure_ascii=False) + "\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _cleaned_name(filename: str) -> str:
    stem = filename.rsplit(".", 1)[0] if "." in filename else filename
    return f"{stem}.cleaned.jsonl"


def clean_file(session: Session, project_id: str, file_id: str, options: CleaningOptions,
               storage: Storage) -> File:
    """Clean a stored fine-tune file into a new validated JSONL file; the report lands in stats.cleaning."""
    src = get_file(session, project_id, file_id)
    if src.purpose != "fine-tune":
        raise InvalidRequest(f"File '{src.id}' has purpose '{src.purpose}'; only fine-tune files can be "
                             "cleaned.", param="file_id", code="invalid_file_purpose")
    cleaner = Cleaner(options, _token_counter(options))
    try:
        src_path = storage.local_file(src.storage_key)
    except FileNotFoundError:
        raise NotFound(f"The content of {file_id} is no longer stored.", param="file_id",
                       code="file_not_found") from None
    kind = (src.stats or {}).get("kind", "jsonl")
    session.rollback()  # only reads so far: cleaning (tokenizing) takes a while and holds no transaction
    with staged_file(storage, suffix=".jsonl") as tmp:
        _write_cleaned(src_path, kind, tmp, cleaner)
        if cleaner.report.output_rows == 0:
            raise InvalidRequest(f"Cleaning removed every row of {file_id} ({cleaner.report.summary()}).",
                                 param="file_id", code="empty_after_cleaning")
        src = get_file(session, project_id, file_id)  # a new transaction: still there?
        return _store_cleaned(session, src, tmp, cleaner.report, options, storage)


def _store_cleaned(session: Session, src: File, tmp: Path, report: CleaningReport,
                   options: CleaningOptions, storage: Storage) -> File:
    checked = validate_file(tmp, "jsonl", max_line_bytes=get_settings().max_line_bytes)
    if checked.errors:  # a scrubbed record can grow past the line limit
        raise InvalidFileFormat(checked)
    stats = {**checked.stats(), "cleaning": {**report.as_dict(), "options": options.model_dump()},
             "source_file": src.id}
    check_storage_quota(session, src.project_id, tmp.stat().st_size)  # a cleaned copy is stored too
    return store_file(session, storage, tmp, project_id=src.project_id, purpose="fine-tune",
                      filename=_cleaned_name(src.filename), report=checked, sha256=_sha256(tmp), stats=stats)
