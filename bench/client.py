"""A lean HTTP/1.1 load generator: asyncio Protocols over raw sockets, callbacks only.

The client must never be what the benchmark measures, so there is no task or
future per request: each keep-alive connection parses its response incrementally
in ``data_received`` (Content-Length or chunked bodies, SSE events counted by
their blank-line terminators) and writes its next request from that callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from time import perf_counter
from typing import Literal

Mode = Literal["loop", "once"]

_IDLE, _HEAD, _BODY, _CSIZE, _CDATA, _CCRLF, _TRAILER = range(7)
_NL = 10
_OVERHEAD = b"x-remotellm-overhead-ms:"
_CONNECT_BATCH = 128  # connects in flight at once: stay far below listen backlogs


@dataclass(frozen=True)
class Job:
    """What one client process runs: `connections` keep-alive connections to host:port.

    ``loop`` sends request after request on each connection until `duration` has
    passed (closed loop); ``once`` sends one request per connection and waits for
    all answers. `timeout` bounds the whole run after the start signal.
    """

    host: str
    port: int
    request: bytes
    connections: int
    mode: Mode
    duration: float = 0.0
    timeout: float = 30.0
    expect_events: int = 0  # a stream with fewer SSE events counts as short


@dataclass
class Result:
    """Raw outcome of a run; `merge` adds up the results of several processes."""

    started: float = 0.0
    ended: float = 0.0
    completed: int = 0  # 2xx responses read to their end
    errors: int = 0  # non-2xx responses
    failures: int = 0  # connection lost mid-response, or unfinished at the timeout
    short: int = 0  # streams that ended cleanly with fewer events than expected
    events: int = 0  # SSE data events in completed responses
    latencies: list[float] = field(default_factory=list)  # request sent -> response end
    ttfc: list[float] = field(default_factory=list)  # request sent -> first SSE event
    overhead_ms: list[float] = field(default_factory=list)  # X-Remotellm-Overhead-Ms values
    statuses: dict[int, int] = field(default_factory=dict)  # counts of non-2xx statuses

    @property
    def elapsed(self) -> float:
        return max(self.ended - self.started, 1e-9)

    @staticmethod
    def merge(parts: list[Result]) -> Result:
        out = Result()
        if not parts:
            return out
        out.started = min(p.started for p in parts)
        out.ended = max(p.ended for p in parts)
        for p in parts:
            out.completed += p.completed
            out.errors += p.errors
            out.failures += p.failures
            out.short += p.short
            out.events += p.events
            out.latencies += p.latencies
            out.ttfc += p.ttfc
            out.overhead_ms += p.overhead_ms
            for status, count in p.statuses.items():
                out.statuses[status] = out.statuses.get(status, 0) + count
        return out


def build_request(host: str, port: int, path: str, body: dict[str, object], api_key: str) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


def _header(low: bytes, name: bytes) -> bytes | None:
    """The value of header `name` (lowercase, with its colon) in a lowercased head."""
    i = low.find(b"\r\n" + name)
    if i < 0:
        return None
    i += 2 + len(name)
    end = low.find(b"\r\n", i)
    return low[i:] if end < 0 else low[i:end]


class _Run:
    """Shared state of one run in one process: the job, the results, completion."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        self.job = job
        self.loop = loop
        self.result = Result()
        self.deadline = float("inf")
        self.active = 0
        self.closing = False
        self.done: asyncio.Future[None] = loop.create_future()
        self.conns: list[_Conn] = []
        self.tasks: set[asyncio.Task[None]] = set()  # reconnects in progress

    def finished(self, conn: _Conn, now: float) -> None:
        """A response ended: send the next one (loop mode) or retire the connection."""
        if self.job.mode == "loop" and now < self.deadline and not self.closing:
            conn.send()
            return
        self._retire(now)

    def lost(self, conn: _Conn, busy: bool) -> None:
        now = perf_counter()
        if busy and self.job.mode == "loop" and now < self.deadline:
            task = self.loop.create_task(self._replace(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif busy:
            self._retire(now)

    async def _replace(self, old: _Conn) -> None:
        """Reconnect after the server dropped a connection, and carry on."""
        try:
            _, conn = await self.loop.create_connection(lambda: _Conn(self), self.job.host, self.job.port)
        except OSError:
            self.result.failures += 1
            self._retire(perf_counter())
            return
        self.conns[self.conns.index(old)] = conn
        if self.closing or perf_counter() >= self.deadline:
            self._retire(perf_counter())
        else:
            conn.send()

    def _retire(self, now: float) -> None:
        self.active -= 1
        self.result.ended = max(self.result.ended, now)
        if self.active <= 0 and not self.done.done():
            self.done.set_result(None)


class _Conn(asyncio.Protocol):
    """One keep-alive connection: an incremental HTTP/1.1 response parser."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.state = _IDLE
        self.tail = b""
        self.sent = 0.0
        self.first = 0.0
        self.events = 0
        self.remaining = 0
        self.status = 0
        self.last_nl = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.run.closing:
            return  # aborted by `start` at the end; a timeout was counted there
        busy = self.state != _IDLE
        if busy:
            self.run.result.failures += 1
            self.state = _IDLE
        self.run.lost(self, busy)

    def send(self) -> None:
        assert self.transport is not None
        self.state = _HEAD
        self.tail = b""
        self.first = 0.0
        self.events = 0
        self.last_nl = False
        self.sent = perf_counter()
        self.transport.write(self.run.job.request)

    def data_received(self, data: bytes) -> None:
        now = perf_counter()
        if self.tail:
            data, self.tail = self.tail + data, b""
        pos, n, state = 0, len(data), self.state
        while True:
            if state == _CDATA:
                if pos >= n:
                    break
                end = min(pos + self.remaining, n)
                self._payload(data, pos, end, now)
                self.remaining -= end - pos
                pos = end
                if not self.remaining:
                    self.remaining, state = 2, _CCRLF
            elif state in (_CCRLF, _BODY):
                take = min(self.remaining, n - pos)
                pos += take
                self.remaining -= take
                if self.remaining:
                    break
                if state == _CCRLF:
                    state = _CSIZE
                else:
                    self.state = state = _IDLE
                    self._finish(now)
                    state = self.state
            elif state == _CSIZE:
                i = data.find(b"\r\n", pos)
                if i < 0:
                    break
                size = int(data[pos:i].split(b";", 1)[0], 16)
                pos = i + 2
                state = _CDATA if size else _TRAILER
                self.remaining = size
            elif state == _HEAD:
                i = data.find(b"\r\n\r\n", pos)
                if i < 0:
                    break
                state = self._head(data[pos:i])
                pos = i + 4
            elif state == _TRAILER:
                i = data.find(b"\r\n", pos)
                if i < 0:
                    break
                blank = i == pos
                pos = i + 2
                if blank:
                    self.state = state = _IDLE
                    self._finish(now)
                    state = self.state
            else:  # _IDLE: nothing is expected; drop stray bytes
                pos = n
                break
        self.state = state
        if pos < n:
            self.tail = data[pos:]

    def _head(self, head: bytes) -> int:
        self.status = int(head[9:12])
        low = head.lower()
        overhead = _header(low, _OVERHEAD)
        if overhead is not None:
            with contextlib.suppress(ValueError):
                self.run.result.overhead_ms.append(float(overhead))
        if b"transfer-encoding: chunked" in low:
            return _CSIZE
        length = _header(low, b"content-length:")
        self.remaining = int(length) if length is not None else 0
        return _BODY

    def _payload(self, data: bytes, start: int, end: int, now: float) -> None:
        count = data.count(b"\n\n", start, end)
        if self.last_nl and data[start] == _NL:
            count += 1
        self.last_nl = data[end - 1] == _NL
        if count:
            if not self.events:
                self.first = now
            self.events += count

    def _finish(self, now: float) -> None:
        res = self.run.result
        if 200 <= self.status < 300:
            res.completed += 1
            res.latencies.append(now - self.sent)
            if self.events:
                res.ttfc.append(self.first - self.sent)
                res.events += self.events
            if self.events < self.run.job.expect_events:
                res.short += 1
        else:
            res.errors += 1
            res.statuses[self.status] = res.statuses.get(self.status, 0) + 1
        self.run.finished(self, now)


async def connect(job: Job) -> _Run:
    """Open every connection of the job before the clock starts."""
    loop = asyncio.get_running_loop()
    run = _Run(job, loop)
    for first in range(0, job.connections, _CONNECT_BATCH):
        batch = range(first, min(first + _CONNECT_BATCH, job.connections))
        pairs = await asyncio.gather(*(loop.create_connection(lambda: _Conn(run), job.host, job.port) for _ in batch))
        run.conns += [conn for _, conn in pairs]
    return run


async def start(run: _Run) -> Result:
    """Fire the first request on every connection and wait for the run to end (bounded)."""
    job, res = run.job, run.result
    res.started = res.ended = perf_counter()
    run.deadline = res.started + job.duration if job.mode == "loop" else res.started
    run.active = len(run.conns)
    for conn in run.conns:
        conn.send()
    try:
        await asyncio.wait_for(asyncio.shield(run.done), job.timeout)
    except TimeoutError:
        res.failures += sum(c.state != _IDLE for c in run.conns)
        res.ended = perf_counter()
    run.closing = True
    for conn in run.conns:
        if conn.transport is not None:
            conn.transport.abort()
    await asyncio.sleep(0)  # let connection_lost callbacks run before the loop closes
    return res
