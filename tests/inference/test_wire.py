"""The API -> inference worker keep-alive client: connections are reused, one the worker closed while
idle is replaced transparently, and a worker that is not there is an error the API maps to a 503."""

from __future__ import annotations

import asyncio

import pytest

from app.inference import wire


async def _server(close_after_each: bool) -> tuple[asyncio.Server, list[int]]:
    """Answers every POST with its body; with close_after_each, drops the connection after answering
    (without saying so: what an idle keep-alive timeout looks like to the client)."""
    connections = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                body = await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                if close_after_each:
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, connections


def _url(server: asyncio.Server) -> str:
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/internal"


@pytest.mark.parametrize("close_after_each", [False, True])
def test_posts_reuse_connections_and_survive_one_closed_while_idle(close_after_each: bool) -> None:
    async def scenario() -> list[int]:
        server, connections = await _server(close_after_each)
        async with server:
            pool = wire.pool_for(_url(server), {"Authorization": "Bearer x"})
            assert pool is not None
            for i in range(3):
                assert await pool.post("/predictions", b'{"i": %d}' % i) == (200, b'{"i": %d}' % i)
                await asyncio.sleep(0)  # let the server side close (when it does)
            return connections

    connections = asyncio.run(scenario())
    assert connections[0] == (3 if close_after_each else 1)


def test_no_worker_is_a_connection_error() -> None:
    async def scenario() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        url = _url(server)
        server.close()
        await server.wait_closed()
        pool = wire.pool_for(url, {})
        assert pool is not None
        with pytest.raises(OSError):
            await pool.post("/predictions", b"{}")

    asyncio.run(scenario())
    assert wire.pool_for("https://worker:8001", {}) is None  # https stays with httpx
