"""Streaming multipart/form-data receiver: the `file` part goes straight to a staging file
(hashed and counted on the way), small form fields are kept; nothing else is buffered."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.kit.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

FILE_FIELD = "file"
MAX_FIELD_BYTES = 4096  # purpose and other small text fields
MULTIPART_SLACK = 1 << 20  # headers, boundaries and small fields on top of the file itself
HEAD_BYTES = 4096  # kept for format sniffing


@dataclass
class Upload:
    path: Path
    filename: str = ""
    size: int = 0
    sha256: str = ""
    head: bytes = b""
    has_file: bool = False
    fields: dict[str, str] = field(default_factory=dict)


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"File too large: uploads are limited to {limit} bytes ({limit / 2**20:.0f} MiB).", param="file"
    )


def clean_filename(raw: str) -> str:
    """The client's name reduced to a printable basename (display only, never a path)."""
    base = raw.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    return base[:255] if base not in ("", ".", "..") else "upload"


class _Receiver:
    """MultipartParser callbacks: route each part to the sink (the file) or a small buffer."""

    def __init__(self, sink: IO[bytes], upload: Upload, max_bytes: int,
                 on_field: Callable[[str, str], None]) -> None:
        self.sink, self.up, self.max_bytes, self.on_field = sink, upload, max_bytes, on_field
        self.hasher = hashlib.sha256()
        self.headers: dict[str, str] = {}
        self.header_name = self.header_value = b""
        self.part: str | None = None  # "file" | field name | None (ignored part)
        self.buf = bytearray()
        self.ended = False

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self.part_begin, "on_header_field": self.header_field,
            "on_header_value": self.header_val, "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished, "on_part_data": self.part_data,
            "on_part_end": self.part_end, "on_end": self.end,
        }

    def part_begin(self) -> None:
        self.headers, self.part, self.buf = {}, None, bytearray()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def header_val(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def header_end(self) -> None:
        # latin-1 round-trips the raw bytes; names are decoded as UTF-8 below.
        self.headers[self.header_name.decode("latin-1").lower()] = self.header_value.decode("latin-1")
        self.header_name = self.header_value = b""

    def headers_finished(self) -> None:
        _, opts = parse_options_header(self.headers.get("content-disposition", ""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        if name == FILE_FIELD:
            if self.up.has_file:
                raise InvalidRequest("Send exactly one 'file' part per upload.", param="file")
            self.up.has_file = True
            self.up.filename = clean_filename(opts.get(b"filename", b"").decode("utf-8", "replace"))
            self.part = FILE_FIELD
        elif name and b"filename" not in opts:
            self.part = name

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self.part == FILE_FIELD:
            self.file_data(data[start:end])
        elif self.part is not None:
            self.buf += data[start:end]
            if len(self.buf) > MAX_FIELD_BYTES:
                raise InvalidRequest(f"Form field '{self.part}' is too long.", param=self.part)

    def file_data(self, chunk: bytes) -> None:
        self.up.size += len(chunk)
        if self.up.size > self.max_bytes:
            raise too_large(self.max_bytes)
        if len(self.up.head) < HEAD_BYTES:
            self.up.head += chunk[: HEAD_BYTES - len(self.up.head)]
        self.hasher.update(chunk)
        self.sink.write(chunk)

    def part_end(self) -> None:
        if self.part is not None and self.part != FILE_FIELD:
            value = self.buf.decode("utf-8", "replace")
            self.up.fields[self.part] = value
            self.on_field(self.part, value)  # lets the caller reject early (e.g. a bad purpose)
        self.part = None

    def end(self) -> None:
        self.ended = True


def _boundary(request: Request, max_bytes: int) -> bytes:
    ctype, opts = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not opts.get(b"boundary"):
        raise UnsupportedMediaType("Uploads must be sent as multipart/form-data with a 'file' part.")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes + MULTIPART_SLACK:
        raise too_large(max_bytes)  # refuse before reading anything
    return opts[b"boundary"]


async def receive_upload(request: Request, dest: Path, max_bytes: int,
                         on_field: Callable[[str, str], None]) -> Upload:
    """Stream the request body into `dest` (the `file` part only). Raises on a malformed
    body, a missing file part or a file over `max_bytes`; the caller removes `dest`."""
    upload = Upload(path=dest)
    boundary = _boundary(request, max_bytes)
    with open(dest, "wb") as sink:
        rx = _Receiver(sink, upload, max_bytes, on_field)
        parser = MultipartParser(boundary, rx.callbacks())  # type: ignore[arg-type]
        try:
            async for chunk in request.stream():
                parser.write(chunk)
        except MultipartParseError as e:
            raise InvalidRequest(f"Malformed multipart body: {e}", code="invalid_multipart") from None
        except ClientDisconnect:
            raise InvalidRequest("The client disconnected during the upload.") from None
    if not rx.ended:
        raise InvalidRequest("Incomplete multipart body (no closing boundary).", code="invalid_multipart")
    if not upload.has_file:
        raise InvalidRequest("Missing required parameter: 'file'.", param="file",
                             code="missing_required_parameter")
    upload.sha256 = rx.hasher.hexdigest()
    return upload
