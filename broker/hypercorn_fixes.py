"""Everything this broker needs hypercorn to do differently, in one place, installed by the
serving entry points (``python -m broker``, ``broker.app``), never by building the app.

- **Supported versions only.** The patches below touch hypercorn's private internals, so
  an untested hypercorn refuses to start (setup.cfg pins the same range).
- **Reset cut streams.** hypercorn just forgets a stream whose ASGI app ended without
  finishing its response: no END_STREAM, no RST_STREAM. The client waits until the whole
  connection idles out, and every other stream on it dies with it. The relay ends a broken
  response this way on purpose (a truncated stream must not look complete), so such a
  stream is reset instead.
- **DATA of a refused stream.** Shutting down, hypercorn refuses a new HTTP/2 stream (a
  reset, and no stream object) but hands DATA of the same read to that stream unguarded:
  the KeyError ends ``serve()`` and the broker exits 1 after its drain (a connector that
  re-dialled a draining broker, seen in CI). Such DATA now goes nowhere.
- **Larger receive windows.** hypercorn advertises HTTP/2's default 64 KiB windows and
  offers no setting; a connector's uplink, which carries every reply of the connector,
  then stalls for tens of milliseconds at a time. Streams get 4 MiB and the connection
  16 MiB more. Memory stays bounded: the uplink is read at once, and per-request credit
  bounds what each reply may send ahead.
- **Drain unread request bodies** (hypercorn #329): DATA arriving for a stream whose
  handler already finished tears down the whole HTTP/2 connection — for the tunnel, every
  poll and uplink of a connector. So no response ends before its request body did.
- **One write per connection per loop step.** hypercorn writes every h11 event on its own:
  a response's head, each body message and its end are separate send() calls, and on
  loopback a send costs the sender the receiver's TCP work too (a fifth of the broker's CPU
  in a burst of short streams; py-spy). Writes are gathered until the end of the loop step
  (bounded, drained as before), so a head and the chunks that came with it go out as one.
- **Chunks framed without h11.** h11 spends more on sending one chunk of a streamed
  HTTP/1.1 response (an event object, its state machine, a writer) than all else the broker
  does for it; a chunk changes none of h11's state, so a chunked body's data is framed here
  (RFC 9112 7.1) and h11 keeps the head and the end. Any other body goes through h11.
- **Chunks written straight to the connection.** Past h11, an ASGI body message still
  passes hypercorn's stream, protocol, server and a lock; an HTTP/1.1 stream's scope gets a
  ``remotellm.chunks`` extension (``ChunkWriter``) that hands a chunk to the connection's
  writer, so a relayed chunk skips them (12 % of the broker's instructions per paced chunk).
- **Idle timeouts on a timer.** For every idle spell of a connection (each keep-alive
  request ends one and starts the next) hypercorn starts a task, which ``wait_for`` wraps in
  a second, and cancels both when the next request comes: a tenth of the broker in a burst
  of short streams (py-spy). A timer handle does the same job; the idle connections still
  close at once when the server terminates.
- **Closed connections freed at once.** A connection's parts in hypercorn refer to one
  another (bound methods handed around), so each closed connection waited for a full
  collection, which in a burst scans every live stream: 16-31 ms pauses in the first
  quarter second of a burst of 256 new users, and 3.4 MiB more heap per burst until then.
  Once a connection's server is done, its attributes are dropped and it is freed.
- **No request limit per connection.** hypercorn sends GOAWAY after 1000 requests on a
  connection by default (a setting of its Config only): ``python -m broker`` lifts it.
"""

import asyncio
import contextlib
import weakref
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import h2.errors
import h2.exceptions
import h2.settings
import h11
import priority.priority
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.config import Config
from hypercorn.events import Closed, RawData
from hypercorn.protocol.events import Body, StreamClosed
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import HTTPStream

from broker.asgi import CHUNKS_EXTENSION, ASGIApp, Message, Receive, Scope, Send

try:
    from h11._writers import ChunkedWriter as _ChunkedWriter  # h11's own, to know a chunked body
except ImportError:  # an h11 laid out otherwise: every chunk goes through h11 (_frame_chunks)
    _ChunkedWriter = None  # type: ignore[assignment,misc]

# Tested hypercorn releases (setup.cfg: hypercorn>=0.17,<0.19).
TESTED_VERSIONS = ("0.17.", "0.18.")
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW_EXTRA = 16 * 1024 * 1024
KEEP_ALIVE_MAX_REQUESTS = 2**31  # a tunnel connection carries requests for days
BACKLOG = 1024  # hypercorn's 100 is below a burst of a few hundred new users
BODY_DRAIN_TIMEOUT = 10.0  # an upload we refuse is still read to its end, for at most this long
CORK_LIMIT = 64 * 1024  # gathered bytes past which a write goes out at once


class UnsupportedHypercorn(RuntimeError):
    """The installed hypercorn is not one these fixes were tested on."""


def install(app: ASGIApp) -> ASGIApp:
    """Patch hypercorn (once) and wrap the app; raises UnsupportedHypercorn on an untested one."""
    hypercorn_version = version("hypercorn")
    if not hypercorn_version.startswith(TESTED_VERSIONS):
        raise UnsupportedHypercorn(
            f"hypercorn {hypercorn_version} is untested (supported: {', '.join(v + 'x' for v in TESTED_VERSIONS)})"
        )
    if not getattr(H2Protocol, "_remotellm_patched", False):
        _reset_cut_streams()
        _drop_data_of_refused_streams()
        _enlarge_windows()
        _cork_writes()
        _frame_chunks()
        _time_idle_connections()
        _free_closed_connections()
        H2Protocol._remotellm_patched = True  # type: ignore[attr-defined]
    return DrainBody(app)


def configure(config: Config) -> Config:
    """The hypercorn settings a long-lived tunnel needs (for ``python -m broker``)."""
    config.keep_alive_max_requests = KEEP_ALIVE_MAX_REQUESTS
    config.backlog = BACKLOG
    return config


def _reset_cut_streams() -> None:
    original = H2Protocol.stream_send

    async def stream_send(self: H2Protocol, event: Any) -> None:
        if isinstance(event, StreamClosed):
            buffer = self.stream_buffers.get(event.stream_id)
            if buffer is not None and not buffer._complete:
                with contextlib.suppress(h2.exceptions.ProtocolError):  # the client reset it first
                    self.connection.reset_stream(event.stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
                # What hypercorn itself does when a send fails on a closed stream:
                await buffer.close()
                del self.stream_buffers[event.stream_id]
                with contextlib.suppress(priority.priority.MissingStreamError):
                    self.priority.remove_stream(event.stream_id)
                await self._flush()
        await original(self, event)

    H2Protocol.stream_send = stream_send  # type: ignore[method-assign]


def _after_init(cls: type[Any], extend: Callable[[Any], None]) -> None:
    """Make every new ``cls`` object pass through ``extend`` once its own __init__ is done."""
    original_init = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        extend(self)

    cls.__init__ = __init__


def _drop_data_of_refused_streams() -> None:
    def extend(protocol: H2Protocol) -> None:
        protocol.streams = _Streams()

    _after_init(H2Protocol, extend)


class _Streams(dict[int, Any]):
    """An H2Protocol's streams by id; looking up one that is not there finds no stream."""

    def __missing__(self, stream_id: int) -> "_NoStream":
        return _NO_STREAM


class _NoStream:
    async def handle(self, event: Any) -> None:
        """Whatever it was for (DATA of a refused stream): nobody waits for it."""


_NO_STREAM = _NoStream()


def _enlarge_windows() -> None:
    original_initiate = H2Protocol.initiate

    def extend(protocol: H2Protocol) -> None:
        # A fresh Settings object: values assigned to an existing one stay pending (unsent).
        current: dict[Any, int] = dict(protocol.connection.local_settings)
        protocol.connection.local_settings = h2.settings.Settings(
            client=False, initial_values={**current, h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW}
        )

    async def initiate(self: H2Protocol, *args: Any, **kwargs: Any) -> None:
        # The SETTINGS frame (with the stream window) goes out with the connection preface;
        # the connection window can only grow by a WINDOW_UPDATE right after it.
        original_connection_initiate = self.connection.initiate_connection

        def initiate_connection() -> None:
            original_connection_initiate()
            self.connection.increment_flow_control_window(CONNECTION_WINDOW_EXTRA)

        self.connection.initiate_connection = initiate_connection  # type: ignore[method-assign]
        await original_initiate(self, *args, **kwargs)

    _after_init(H2Protocol, extend)
    H2Protocol.initiate = initiate  # type: ignore[method-assign]


def _cork_writes() -> None:
    def extend(server: TCPServer) -> None:
        server.writer = CorkedWriter(server.writer)  # type: ignore[assignment]

    _after_init(TCPServer, extend)


def _frame_chunks() -> None:
    if _ChunkedWriter is None:
        return
    original_send = H11Protocol.stream_send
    original_create = H11Protocol._create_stream

    async def stream_send(self: H11Protocol, event: Any) -> None:
        if type(event) is Body and event.data and _in_chunked_body(self.connection):
            await self.send(RawData(data=_chunk(event.data)))
            return
        await original_send(self, event)

    async def _create_stream(self: H11Protocol, request: h11.Request) -> None:
        await original_create(self, request)
        stream = self.stream
        if type(stream) is HTTPStream and hasattr(stream, "scope"):  # (no scope: refused, no app)
            extensions: dict[str, Any] = stream.scope["extensions"]
            extensions[CHUNKS_EXTENSION] = ChunkWriter(self, stream)

    H11Protocol.stream_send = stream_send  # type: ignore[method-assign]
    H11Protocol._create_stream = _create_stream  # type: ignore[method-assign]


def _in_chunked_body(connection: Any) -> bool:  # (an h11.Connection)
    """Whether h11 has sent a response head with chunked framing and not yet its end."""
    return connection.our_state is h11.SEND_BODY and type(getattr(connection, "_writer", None)) is _ChunkedWriter


def _chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 7.1); nothing for no data: a chunk of size 0
    would end the body, and the user's client would read what follows as a new response."""
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b""


class ChunkWriter:
    """The ``remotellm.chunks`` extension of an HTTP/1.1 stream (``broker.asgi.chunk_writer``).

    ASGI sends each chunk of a streamed body through hypercorn's stream (a copy of the
    data), its protocol, its server and a lock: nine calls, 12 % of the broker's
    instructions per paced chunk, none of which changes any state once a chunked body has
    begun. So the chunk is framed here and handed to the connection's writer. The head,
    the end and everything else keep to ASGI.
    """

    __slots__ = ("_protocol", "_stream", "_writer")

    def __init__(self, protocol: H11Protocol, stream: HTTPStream) -> None:
        self._protocol = protocol
        self._stream = weakref.ref(stream)  # (its scope holds this writer: no cycle to collect)
        server: TCPServer = protocol.send.__self__  # type: ignore[attr-defined]
        self._writer: CorkedWriter = server.writer  # type: ignore[assignment]

    async def __call__(self, data: bytes) -> bool:
        """Write a chunk; False (nothing written) when the stream is not in a chunked body."""
        if not self._writable():
            return False
        writer = self._writer
        writer.write_now(_chunk(data))
        if writer.may_wait():
            try:
                await writer.drain()
            except (ConnectionError, RuntimeError):  # what hypercorn's own send does on a lost connection
                await self._protocol.handle(Closed())
        return True

    def write_nowait(self, data: bytes) -> bool:
        """Write a chunk if the connection takes what it is sent (nothing to drain);
        False (nothing written) otherwise, or when the stream is not in a chunked body. A
        write past the low-water mark makes the next chunk take the draining way."""
        if not self._writable() or self._writer.may_wait():
            return False
        self._writer.write_now(_chunk(data))
        return True

    def _writable(self) -> bool:
        stream = self._stream()
        return stream is not None and not stream.closed and _in_chunked_body(self._protocol.connection)


def _time_idle_connections() -> None:
    def extend(server: TCPServer) -> None:
        server.idle_task = IdleTimer(server)  # type: ignore[assignment]

    _after_init(TCPServer, extend)


def _free_closed_connections() -> None:
    original_run = TCPServer.run

    async def run(self: TCPServer) -> None:
        try:
            await original_run(self)
        finally:
            # Its parts refer to one another (hypercorn hands bound methods around), so a
            # closed connection waited for a full collection; done with, nothing uses them.
            self.__dict__.clear()

    TCPServer.run = run  # type: ignore[method-assign]


class IdleTimer:
    """A TCPServer's idle timeout (hypercorn's ``idle_task``): past ``keep_alive_timeout``
    idle, or at once when the server terminates, the connection closes as hypercorn's own
    ``_idle_timeout`` would close it."""

    __slots__ = ("_handle", "_idle", "_server")

    def __init__(self, server: TCPServer) -> None:
        self._server = server
        self._idle = _idle_connections(server.context)  # its worker's
        self._handle: asyncio.TimerHandle | None = None

    async def restart(self, task_group: Any, action: Any) -> None:
        """(``action`` is hypercorn's task-based timeout, which this replaces.)"""
        self._cancel()
        server = self._server
        if server.context.terminated.is_set():
            self._expire()
            return
        self._handle = server.loop.call_later(server.config.keep_alive_timeout, self._expire)
        self._idle.add(self)

    async def stop(self) -> None:
        self._cancel()

    def _cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._idle.discard(self)

    def _expire(self) -> None:
        self._cancel()
        server = self._server
        closing = server._initiate_server_close()
        try:  # (where hypercorn's own idle task ran)
            server._task_group._task_group.create_task(closing)
        except RuntimeError:  # its task group has ended: the connection is closing anyway
            closing.close()


def _idle_connections(context: Any) -> "set[IdleTimer]":
    """The idle connections of a worker, closed together when it terminates (one task per
    worker waits for that, not one per connection)."""
    idle: set[IdleTimer] | None = getattr(context, "_remotellm_idle", None)
    if idle is None:
        idle = context._remotellm_idle = set()

        async def close_when_terminated() -> None:
            await context.terminated.wait()
            for timer in list(idle):
                timer._expire()

        context._remotellm_idle_watch = asyncio.ensure_future(close_when_terminated())
    return idle


class CorkedWriter:
    """A StreamWriter whose writes of one loop step leave as one, at the step's end.

    Backpressure is the writer's own: ``drain`` sends what is gathered once it reaches
    CORK_LIMIT, then waits as StreamWriter does. Closing sends what is gathered first.
    """

    __slots__ = ("_loop", "_parts", "_size", "_writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._loop = asyncio.get_running_loop()
        self._parts: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        if not self._parts:
            self._loop.call_soon(self.flush)
        self._parts.append(data)
        self._size += len(data)

    def write_now(self, data: bytes) -> None:
        """Write at once, past the cork: a relayed chunk has nothing to wait for. Unless
        writes of this step are gathered already; then it goes after them, in order."""
        if self._parts:
            self.write(data)
        else:
            self._send(data)

    def may_wait(self) -> bool:
        """Whether ``drain`` has anything to do: send a full cork, wait for a paused transport
        (or one past its low-water mark, about to pause), or report a closing one."""
        transport = self._writer.transport
        if self._size >= CORK_LIMIT or transport.is_closing():
            return True
        return bool(transport.get_write_buffer_size() > transport.get_write_buffer_limits()[0])

    async def drain(self) -> None:
        if self._size >= CORK_LIMIT:
            self.flush()
        await self._writer.drain()

    def flush(self) -> None:
        """Send what is gathered (a broken connection drops it: its reader learns of the loss)."""
        if not self._parts:
            return
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts.clear()
        self._size = 0
        self._send(data)

    def _send(self, data: bytes) -> None:
        # (try, not contextlib.suppress: this runs for every chunk, and costs a fifth as much)
        try:  # noqa: SIM105
            self._writer.write(data)
        except (ConnectionError, RuntimeError):  # (uvloop raises on a closed transport)
            pass

    def write_eof(self) -> None:
        self.flush()
        self._writer.write_eof()

    def close(self) -> None:
        self.flush()
        self._writer.close()

    async def wait_closed(self) -> None:
        await self._writer.wait_closed()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._writer.get_extra_info(name, default)


class DrainBody:
    """Reads what is left of a request body before the final response message.

    hypercorn tears down a whole HTTP/2 connection when DATA arrives for a stream
    whose handler already finished (hypercorn #329) — for the tunnel that is every
    poll and reply of a connector. So no response ends before its request body did.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = False

        async def tracking_receive() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_done = True
            return message

        async def draining_send(message: Message) -> None:
            if not body_done and message["type"] == "http.response.body" and not message.get("more_body"):
                try:
                    async with asyncio.timeout(BODY_DRAIN_TIMEOUT):
                        while not body_done:
                            await tracking_receive()
                except TimeoutError:
                    pass
            await send(message)

        await self.app(scope, tracking_receive, draining_send)
