"""A lean httpx transport for the hop to the local LLM: HTTP/1.1 keep-alive, one write.

httpx stays the client API, but its default pool is the connector's biggest cost (a known
httpx issue): it writes a request's head and body separately and does a great deal of
bookkeeping per request. This transport writes each request in one go, parses with h11
(httpx's own HTTP/1.1 parser) and keeps idle connections for reuse.

A streamed body (an audio upload) goes out chunked as it arrives, while the response is
awaited: chunked framing says exactly what the connector got, where a Content-Length
taken from the user would be a claim the LLM could see broken mid-body; every HTTP/1.1
server must accept it (RFC 9112 6.1).
"""

import asyncio
import re
import ssl
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from enum import Enum
from typing import cast

import h11
import httpx

CONNECT_TIMEOUT = 10.0
# Idle connections kept per origin: as many as a burst of streams uses, so the next burst
# opens none (256 paced streams reopened 192 connections with 64, a third of their first-chunk
# wait). Each is dropped after IDLE_EXPIRY, before common servers' keep-alive timeouts (5 s in
# llama.cpp's server and in uvicorn, which serves vLLM): the connector never
# holds a connection the server is about to close, nor a server worker longer than it would.
MAX_IDLE = 256
IDLE_EXPIRY = 4.0
READ_SIZE = 64 << 10  # bytes of one read at most, and unread bytes past which reading pauses
# A chunked body's size lines and trailers, at most (h11's own bound for a head).
MAX_CHUNK_LINE = 16 * 1024

Origin = tuple[str, str, int]  # scheme, host, port: fixed by --llm-url, never by a request


class Dechunker:
    """The chunked transfer coding (RFC 9112 7.1), sans-IO: bytes in, the body's data out.

    Size lines and trailers are bounded (MAX_CHUNK_LINE); anything else raises h11's
    RemoteProtocolError, as h11 itself would.
    """

    __slots__ = ("_buf", "_left", "_state")

    def __init__(self, data: bytes = b"") -> None:
        self._buf = bytearray(data)
        self._state = _SIZE
        self._left = 0  # bytes of the current chunk's data still to come

    @property
    def done(self) -> bool:
        return self._state is _DONE

    @property
    def leftover(self) -> bool:
        """Bytes past the body's end (the server sent more than one answer)."""
        return bool(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def take(self) -> bytes:
        """The body's data fed so far and not taken yet (b"" if none)."""
        buf, out = self._buf, []
        while self._state is _SIZE:  # whole chunks, as LLM servers write them: one match each
            whole = _WHOLE_CHUNK.match(buf)
            if whole is None:
                break
            start = whole.end()
            end = start + int(whole[1], 16)
            # The last chunk (trailers follow) goes the long way below; so does one cut short
            # or longer than its size (an error, raised there).
            if end == start or buf[end : end + 2] != b"\r\n":
                break
            out.append(bytes(buf[start:end]))
            del buf[: end + 2]
        while self._state is not _DONE:
            if self._state is _DATA:
                if not buf:
                    break
                piece = bytes(buf[: self._left])
                del buf[: len(piece)]
                out.append(piece)
                self._left -= len(piece)
                if self._left:
                    break
                self._state = _DATA_END
                continue
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > MAX_CHUNK_LINE:
                    raise h11.RemoteProtocolError("chunk size line too long")
                break
            line = bytes(buf[:end])
            del buf[: end + 2]
            self._line(line)
        return out[0] if len(out) == 1 else b"".join(out)

    def _line(self, line: bytes) -> None:
        if self._state is _DATA_END:
            if line:
                raise h11.RemoteProtocolError("chunk data longer than its size")
            self._state = _SIZE
        elif self._state is _TRAILERS:
            if not line:
                self._state = _DONE
        else:
            size_text = line.split(b";", 1)[0].strip()
            if not size_text or len(size_text) > 16 or size_text.strip(b"0123456789abcdefABCDEF"):
                raise h11.RemoteProtocolError("invalid chunk size")
            self._left = int(size_text, 16)
            self._state = _DATA if self._left else _TRAILERS


# A chunk's size line (no extension) and its data: the common case, parsed in one step.
_WHOLE_CHUNK = re.compile(rb"([0-9a-fA-F]{1,16})\r\n")


class _Part(Enum):
    """Where a Dechunker is in the body."""

    SIZE = "a chunk's size line"
    DATA = "a chunk's data"
    DATA_END = "the CRLF after a chunk's data"
    TRAILERS = "the trailer section"
    DONE = "past the body's end"


_SIZE, _DATA, _DATA_END, _TRAILERS, _DONE = _Part


class _Stream(asyncio.Protocol):
    """A connection to the LLM as the transport uses it: what it needs of a StreamReader and
    a StreamWriter, for a fraction of their cost per read (an answer has thousands). A read
    takes what has arrived, as it arrived (no copy into a buffer and out again), up to
    READ_SIZE; reading pauses past READ_SIZE unread, and ``drain`` waits while the socket's
    buffer is full."""

    __slots__ = ("_closed", "_data", "_eof", "_error", "_loop", "_paused", "_reader", "_size", "_transport", "_writer")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport  # (connection_made sets it, before any other call)
        self._data: list[bytes] = []  # arrived, not read yet
        self._size = 0
        self._eof = False
        self._error: Exception | None = None  # the connection broke
        self._closed = False
        self._paused = False  # reading, past READ_SIZE unread
        self._reader: asyncio.Future[None] | None = None  # a read waiting for data
        self._writer: asyncio.Future[None] | None = None  # a drain waiting for room (None: room)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # (uvloop's is none by isinstance)

    def data_received(self, data: bytes) -> None:
        self._data.append(data)
        self._size += len(data)
        if self._size > READ_SIZE and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        _resolve(self._reader)

    def eof_received(self) -> bool:
        self._eof = True
        _resolve(self._reader)
        return False  # (the transport closes: h11 learns the answer ended with the connection)

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = self._closed = True
        self._error = exc
        _resolve(self._reader)
        self.resume_writing()  # (drain then raises)

    def pause_writing(self) -> None:
        if self._writer is None:
            self._writer = self._loop.create_future()

    def resume_writing(self) -> None:
        _resolve(self._writer)
        self._writer = None

    async def read(self) -> bytes:
        """What has arrived and was not read yet (READ_SIZE at most), waiting for some; b"" at
        the end. Raises the error that broke the connection once all before it was read."""
        while not self._data:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._reader = self._loop.create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        data = self._data[0] if len(self._data) == 1 else b"".join(self._data)
        self._data.clear()
        self._size = 0
        if len(data) > READ_SIZE:  # (a socket read can bring several times as much)
            self._data.append(data[READ_SIZE:])
            self._size = len(data) - READ_SIZE
            data = data[:READ_SIZE]
        if self._paused and self._size <= READ_SIZE:
            self._paused = False
            self._transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        if not self._closed:
            self._transport.write(data)

    async def drain(self) -> None:
        """Wait while the socket's buffer is full; ConnectionResetError once the connection is lost."""
        if self._writer is not None:
            await asyncio.shield(self._writer)  # (shared by nobody else, but a cancel must not break it)
        if self._closed:
            raise ConnectionResetError("the LLM connection is lost")

    def close(self) -> None:
        self._transport.close()


def _resolve(waiter: "asyncio.Future[None] | None") -> None:
    """Wake what waits on ``waiter``, if anything still does."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class _Connection:
    __slots__ = ("h11", "origin", "reused", "stream", "upload")

    def __init__(self, origin: Origin, stream: _Stream) -> None:
        self.origin = origin
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.reused = False
        self.upload: asyncio.Task[None] | None = None  # a streamed body still being written

    async def next_event(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(await self.stream.read())

    def chunked_body_ended(self, keep_alive: bool, leftover: bool) -> None:
        """A chunked body was read to its end (by _Body, not h11): a connection that stays
        open gets a fresh h11 connection for its next request."""
        if keep_alive and not leftover and self.h11.our_state is h11.DONE:
            self.h11 = h11.Connection(h11.CLIENT)

    def close(self) -> None:
        if self.upload is not None:
            self.upload.cancel()
        self.stream.close()

    async def write_body(self, body: AsyncIterable[bytes]) -> None:
        """Write a streamed body as the LLM's socket takes it: ``drain`` waits while the
        buffers are full, and the next piece is asked for only then (which is what grants
        the broker credit for more)."""
        try:
            async for data in body:
                self.stream.write(self.h11.send(h11.Data(data=data)) or b"")
                await self.stream.drain()
            self.stream.write(self.h11.send(h11.EndOfMessage()) or b"")
            await self.stream.drain()
        except (OSError, h11.LocalProtocolError):
            # The LLM answered early (or the socket broke, which the response side sees
            # too): stop writing, and let what it answered be read.
            return


def _serialize(conn: h11.Connection, head: h11.Request, body: bytes) -> bytes:
    parts = [conn.send(head)]
    if body:
        parts.append(conn.send(h11.Data(data=body)))
    parts.append(conn.send(h11.EndOfMessage()))
    return b"".join(part for part in parts if part)


class _IdlePool:
    """Idle keep-alive connections of one origin, newest reused first, each closed once it
    has been idle for ``expiry`` seconds (checked on every use, and by a timer while any
    is kept, so a burst's connections do not linger after it)."""

    def __init__(self, expiry: float, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._expiry = expiry
        self._limit = limit
        self._clock = clock
        self._conns: deque[tuple[float, _Connection]] = deque()  # oldest left, newest right
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._conns)

    def take(self) -> _Connection | None:
        self.sweep()
        return self._conns.pop()[1] if self._conns else None

    def put(self, conn: _Connection) -> None:
        self._conns.append((self._clock(), conn))
        if len(self._conns) > self._limit:
            self._conns.popleft()[1].close()
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._expiry, self._tick)

    def sweep(self) -> None:
        """Close the connections idle for longer than the expiry."""
        stale = self._clock() - self._expiry
        while self._conns and self._conns[0][0] <= stale:
            self._conns.popleft()[1].close()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._conns:
            self._conns.popleft()[1].close()

    def _tick(self) -> None:
        self._timer = None
        self.sweep()
        if self._conns:  # the next check when the oldest expires
            wait = self._conns[0][0] + self._expiry - self._clock()
            self._timer = asyncio.get_running_loop().call_later(max(wait, 0.05), self._tick)


class LLMTransport:
    def __init__(
        self, *, idle_expiry: float = IDLE_EXPIRY, max_idle: int = MAX_IDLE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._idle: dict[Origin, _IdlePool] = {}
        self._pool = (idle_expiry, max_idle, clock)
        self._ssl = ssl.create_default_context()

    async def send(
        self,
        origin: Origin,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        data: bytes | AsyncIterable[bytes],
    ) -> httpx.Response:
        """One request to ``origin``; its response with the body still to be read. A body
        given as an iterable is streamed, on a fresh connection (it cannot be sent twice)."""
        streamed = not isinstance(data, bytes)
        if isinstance(data, bytes):
            framing = [(b"content-length", b"%d" % len(data))] if data else []
        else:
            framing = [(b"transfer-encoding", b"chunked")]
        try:
            head = h11.Request(method=method, target=target, headers=[*headers, *framing])
        except h11.LocalProtocolError:
            raise httpx.LocalProtocolError("the request is not valid HTTP/1.1") from None
        while True:
            conn = await self._connection(origin, fresh=streamed)
            try:
                if isinstance(data, bytes):
                    conn.stream.write(_serialize(conn.h11, head, data))
                else:
                    conn.stream.write(conn.h11.send(head) or b"")
                    conn.upload = asyncio.create_task(conn.write_body(data))
                response = await conn.next_event()
                break
            except (OSError, h11.ProtocolError) as exc:
                conn.close()
                if conn.reused:  # the server closed an idle connection under us: once more, fresh
                    continue
                # The type alone: h11's messages may quote header values, and they carry the LLM key.
                raise httpx.RemoteProtocolError(type(exc).__name__) from exc
            except BaseException:  # cancelled: closing the connection is what tells the LLM to stop
                conn.close()
                raise
        if not isinstance(response, h11.Response):
            conn.close()
            raise httpx.RemoteProtocolError("no response")
        return httpx.Response(
            response.status_code,
            headers=response.headers.raw_items(),
            stream=_Body(self, conn, _chunked(method, response)),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def _connection(self, origin: Origin, *, fresh: bool = False) -> _Connection:
        idle = self._idle.get(origin)
        conn = idle.take() if idle is not None and not fresh else None
        if conn is not None:
            conn.reused = True
            return conn
        scheme, host, port = origin
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                tls = self._ssl if scheme == "https" else None
                _, stream = await asyncio.get_running_loop().create_connection(_Stream, host, port, ssl=tls)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from exc
        except OSError as exc:
            raise httpx.ConnectError(str(exc)) from exc
        return _Connection(origin, stream)

    def _release(self, conn: _Connection) -> None:
        """Back to the pool if the exchange ended cleanly and both sides keep the connection."""
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
        if conn.h11.our_state is h11.IDLE and conn.h11.their_state is h11.IDLE:
            conn.upload = None  # (written whole: what it was is done)
            idle = self._idle.get(conn.origin)
            if idle is None:
                idle = self._idle[conn.origin] = _IdlePool(*self._pool)
            idle.put(conn)
            return
        conn.close()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            idle.close()
        self._idle.clear()


def _chunked(method: str, response: h11.Response) -> bool | None:
    """Whether the body is chunked (None: it is not) and, if so, whether the connection may
    be kept after it — as h11 decides both (RFC 9112 6.3, 9.3)."""
    if method == "HEAD" or response.status_code in (204, 304):
        return None
    if _tokens(response, b"transfer-encoding") != [b"chunked"]:
        return None
    return b"close" not in _tokens(response, b"connection") and response.http_version >= b"1.1"


def _tokens(response: h11.Response, name: bytes) -> list[bytes]:
    """The comma-separated values of a header, lowercased (h11 gives names lowercased)."""
    return [
        token.strip().lower()
        for key, value in response.headers
        for token in value.split(b",")
        if key == name and token.strip()
    ]


class _Body(httpx.AsyncByteStream):
    """The response body as it arrives; closing it early closes the connection (the LLM
    notices the user has gone and stops generating)."""

    def __init__(self, transport: LLMTransport, conn: _Connection, chunked: bool | None) -> None:
        self._transport = transport
        self._conn = conn
        self._chunked = chunked  # None: h11 reads the body; else whether to keep the connection
        self._done = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._dechunked(self._chunked) if self._chunked is not None else self._by_h11()

    async def _dechunked(self, keep_alive: bool) -> AsyncIterator[bytes]:
        """A chunked body, read here rather than by h11: h11 spends ~68,000 instructions per
        streamed event on its state machine (measured), more than all else the connector
        does for it. Each read gives one piece: the data of every chunk in it."""
        conn, body = self._conn, Dechunker(self._conn.h11.trailing_data[0])
        try:
            while True:
                data = body.take()
                if data:
                    yield data
                if body.done:
                    break
                more = await conn.stream.read()
                if not more:
                    raise h11.RemoteProtocolError("peer closed connection without sending complete message body")
                body.feed(more)
        except (OSError, h11.ProtocolError) as exc:
            raise httpx.ReadError(type(exc).__name__) from exc
        conn.chunked_body_ended(keep_alive, body.leftover)
        self._done = True

    async def _by_h11(self) -> AsyncIterator[bytes]:
        """Any other body (Content-Length, or until the connection closes), as h11 reads it."""
        try:
            while True:
                event = await self._conn.next_event()
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    self._done = True
                    return
                elif isinstance(event, h11.ConnectionClosed):
                    raise httpx.RemoteProtocolError("the LLM closed the connection mid-response")
        except (OSError, h11.ProtocolError) as exc:
            raise httpx.ReadError(type(exc).__name__) from exc

    async def aclose(self) -> None:
        if self._done:
            self._transport._release(self._conn)
        else:
            self._conn.close()
