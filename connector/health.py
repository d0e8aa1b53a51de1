"""The connector's local health endpoint: a tiny HTTP/1.1 responder on loopback."""

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec

READ_TIMEOUT = 5.0


async def serve_health(port: int, report: Callable[[], dict[str, Any]]) -> asyncio.Server:
    """``report``: the health document (connector.fleet.Fleet.health)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                request_line = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            if request_line.split(b" ")[:2] == [b"GET", b"/health"]:
                body = msgspec.json.encode(report())
                head = b"HTTP/1.1 200 OK\r\n"
            else:
                body, head = b'{"error": "not found"}', b"HTTP/1.1 404 Not Found\r\n"
            writer.write(
                head
                + b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
                + body
            )
            await writer.drain()
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)
