"""A minimal HTTP/1.1 keep-alive client for the one hot internal call: a non-streamed POST from the API to
the inference worker (`http://` only; uvicorn answers it with a Content-Length body). httpx spent most
of the API's CPU per prediction (about 2.5 ms, against the model's few) in its connection-pool
bookkeeping; this is a plain write and two reads on an idle connection from a per-event-loop pool.
Streams, `https://` and everything else keep using httpx."""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections import deque
from urllib.parse import urlsplit

IDLE_S = 4.0  # below uvicorn's 5 s keep-alive: never reuse a connection the worker is closing
MAX_IDLE = 256

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class WireError(ConnectionError):
    """The worker's answer could not be read (closed early, or not a Content-Length response)."""


class Pool:
    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"wire: http:// URLs only, not {base_url!r}")
        self.host, self.port, self.prefix = url.hostname, url.port or 80, url.path.rstrip("/")
        self._head = f"Host: {url.netloc}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._idle: deque[tuple[Conn, float]] = deque()

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """(status, body). A kept-alive connection that turns out closed before any answer byte (the
        worker dropped it idle: the request was never read) is retried once on a fresh one."""
        conn = self._take()
        if conn is not None:
            try:
                return await self._exchange(conn, path, body)
            except WireError:
                pass
        return await self._exchange(await self._connect(), path, body, fresh=True)

    async def _exchange(self, conn: Conn, path: str, body: bytes, fresh: bool = False) -> tuple[int, bytes]:
        reader, writer = conn
        try:
            writer.write(f"POST {self.prefix}{path} HTTP/1.1\r\n{self._head}Content-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                raise WireError("the inference worker closed the connection") from exc
            status, length, keep = _parse_head(head)
            data = await reader.readexactly(length)
        except BaseException:
            _close(writer)
            raise
        if keep and len(self._idle) < MAX_IDLE:
            self._idle.append((conn, time.monotonic() + IDLE_S))
        else:
            _close(writer)
        return status, data

    def _take(self) -> Conn | None:
        now = time.monotonic()
        while self._idle:
            (reader, writer), expires = self._idle.pop()  # the most recently used: surely still open
            if expires > now and not reader.at_eof() and not writer.is_closing():
                return reader, writer
            _close(writer)
        return None

    async def _connect(self) -> Conn:
        return await asyncio.open_connection(self.host, self.port)


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError) as exc:
        raise WireError(f"not an HTTP response: {lines[0][:80]!r}") from exc
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" not in headers:
        raise WireError("the inference worker's answer has no Content-Length")
    return status, int(headers["content-length"]), headers.get("connection", "").lower() != "close"


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


_POOLS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], Pool]] = (
    weakref.WeakKeyDictionary())


def pool_for(base_url: str, headers: dict[str, str]) -> Pool | None:
    """This event loop's pool for the worker at `base_url`; None where only httpx will do (https)."""
    if not base_url.startswith("http://"):
        return None
    pools = _POOLS.setdefault(asyncio.get_running_loop(), {})
    key = (base_url, repr(sorted(headers.items())))
    pool = pools.get(key)
    if pool is None:
        pool = pools[key] = Pool(base_url, headers)
    return pool
