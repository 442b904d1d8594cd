"""A stored file's status."""

from __future__ import annotations

from enum import StrEnum


class FileStatus(StrEnum):
    processed = "processed"
    error = "error"
    deleted = "deleted"
