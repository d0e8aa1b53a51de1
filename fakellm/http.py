"""HTTP/1.1 for the fake LLM: request framing, streamed bodies, replies and hang-up detection."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from http import HTTPStatus

import msgspec

JSON = b"application/json"
_READ = 65536


class Request(msgspec.Struct):
    method: str
    path: str
    query: str
    headers: dict[str, str]


@functools.cache
def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


class Conn:
    """One client connection: HTTP/1.1 framing plus hang-up detection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: bytes):
        self.reader = reader
        self.writer = writer
        self.name = name
        self.keep_alive = True
        self._watch: asyncio.Task[bytes] | None = None
        self._body: AsyncIterator[bytes] | None = None

    async def read_head(self) -> Request | None:
        """Next request head, or None on a clean close; ValueError if malformed.

        The body is left on the wire for `body()` so that uploads can be streamed.
        """
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            key, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"bad header line {line!r}")
            key, value = key.strip().lower(), value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.1":
            self.keep_alive = "close" not in connection
        else:
            self.keep_alive = "keep-alive" in connection
        if headers.get("expect", "").lower() == "100-continue":
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._body = self._chunks(headers)
        path, _, query = target.partition("?")
        return Request(method, path, query, headers)

    def body(self) -> AsyncIterator[bytes]:
        """The request body as it arrives, at most 64 KiB at a time; iterate it once."""
        assert self._body is not None
        return self._body

    async def read_body(self) -> bytes:
        return b"".join([chunk async for chunk in self.body()])

    async def drain_body(self) -> None:
        """Discard what the handler did not read, so the next request starts in frame."""
        if self._body is not None:
            async for _ in self._body:
                pass

    async def _chunks(self, headers: dict[str, str]) -> AsyncIterator[bytes]:
        if "chunked" not in headers.get("transfer-encoding", "").lower():
            async for piece in self._exactly(int(headers.get("content-length", "0"))):
                yield piece
            return
        while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
            async for piece in self._exactly(size):
                yield piece
            await self.reader.readexactly(2)
        while await self.reader.readuntil(b"\r\n") != b"\r\n":
            pass  # skip trailers

    async def _exactly(self, size: int) -> AsyncIterator[bytes]:
        """`size` bytes as they arrive, in pieces: an upload is never held whole."""
        while size:
            piece = await self.reader.read(min(size, _READ))
            if not piece:
                raise asyncio.IncompleteReadError(b"", size)
            size -= len(piece)
            yield piece

    def _head(self, status: int, ctype: bytes, framing: bytes) -> bytes:
        close = b"" if self.keep_alive else b"Connection: close\r\n"
        return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%sX-Fake-LLM: %s\r\n%s\r\n" % (
            status,
            _reason(status),
            ctype,
            framing,
            self.name,
            close,
        )

    async def send(self, status: int, payload: bytes, ctype: bytes = JSON) -> None:
        framing = b"Content-Length: %d\r\n" % len(payload)
        self.writer.write(self._head(status, ctype, framing) + payload)
        await self.writer.drain()

    def start_stream(self, ctype: bytes) -> None:
        framing = b"Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n"
        self.writer.write(self._head(200, ctype, framing))

    async def send_chunk(self, data: bytes) -> None:
        """One HTTP chunk, flushed at once so clients see it live."""
        self.writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await self.writer.drain()

    async def end_stream(self) -> None:
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()

    def abort(self) -> None:
        self.keep_alive = False
        self.writer.transport.abort()

    async def idle(self, seconds: float | None) -> bool:
        """Wait `seconds` (None: forever) but return True as soon as the client hangs up.

        Reading is the only way to see a hang-up while nothing is being written.
        """
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        while True:
            if self._watch is None:
                self._watch = asyncio.create_task(self.reader.read(_READ))
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            done, _ = await asyncio.wait((self._watch,), timeout=timeout)
            if not done:
                return False
            watch, self._watch = self._watch, None
            if watch.exception() is not None or not watch.result():
                return True
            self.keep_alive = False  # pipelined bytes mid-response: framing is lost

    async def finish(self) -> None:
        """Stop watching for hang-ups so the next request can be read."""
        watch, self._watch = self._watch, None
        if watch is None:
            return
        if watch.cancel():
            await asyncio.wait((watch,))  # the read must really stop before the next one starts
        else:
            watch.exception()  # already done: EOF, error or pipelined bytes
            self.keep_alive = False
