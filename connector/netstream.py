"""httpcore's network backend on asyncio's own transports, for the connector's links.

httpcore runs on anyio under asyncio. Each write then costs a cancel scope, a lock, a
loop step (anyio's checkpoint) and a wait for an event; each read a cancel scope and a
task lookup. The uplink writes hundreds of times a second: its writes were a quarter of
the connector's CPU per relayed chunk (py-spy), and without anyio's layers the connector
spends about 5 % less per chunk. Here a write is a transport write and a drain that waits
only when the buffer is full; a read waits for the stream's data. Errors map to httpcore's
exceptions as its anyio backend maps them.
"""

import asyncio
import select
import socket
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore

# A socket option as httpcore passes it: (level, option, value[, length]).
SocketOption = tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One connection, as an asyncio StreamReader/StreamWriter pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):  # (None: no timer at all)
                return await self._reader.read(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        writer = self._writer
        try:
            writer.write(buffer)
            transport = writer.transport
            if transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[0]:
                # At or under the low-water mark writing is not paused: drain only reports a
                # lost connection, without waiting, so no timer is needed (one per write).
                await writer.drain()
                return
            async with asyncio.timeout(timeout):
                await writer.drain()
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc)) from exc
        except (OSError, RuntimeError) as exc:  # (a closed transport raises RuntimeError on uvloop)
            raise httpcore.WriteError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        self._writer.close()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError as exc:
            self._writer.close()
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except (OSError, ssl.SSLError) as exc:
            self._writer.close()
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        return self

    def get_extra_info(self, info: str) -> Any:
        writer = self._writer
        if info == "ssl_object":
            return writer.get_extra_info("ssl_object")
        if info == "client_addr":
            return writer.get_extra_info("sockname")
        if info == "server_addr":
            return writer.get_extra_info("peername")
        sock: socket.socket | None = writer.get_extra_info("socket")
        if info == "socket":
            return sock
        if info == "is_readable":  # (what httpcore asks of an idle pooled connection: has it closed?)
            return self._reader.at_eof() or self._reader.exception() is not None or _readable(sock)
        return None


def _readable(sock: socket.socket | None) -> bool:
    """Whether an idle socket has something to read (for an idle connection: its end)."""
    if sock is None or sock.fileno() < 0:
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """Connections for httpcore's pools (``network_backend=``)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, local_addr=(local_address, 0) if local_address else None
                )
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        sock: socket.socket = writer.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return AsyncioStream(reader, writer)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[SocketOption] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("the connector dials TCP only")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
