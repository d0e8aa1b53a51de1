"""broker.hypercorn_fixes against a real hypercorn: what it advertises, and what it refuses."""

import asyncio
import gc
import socket
from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from broker import hypercorn_fixes
from broker.asgi import chunk_writer
from broker.hypercorn_fixes import CONNECTION_WINDOW_EXTRA, STREAM_WINDOW
from tests.support import Stack, free_port


def handshake(port: int) -> list[h2.events.Event]:
    """Open an h2c connection and collect what the server says first."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    events: list[h2.events.Event] = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(conn.data_to_send())
        while not any(isinstance(e, h2.events.WindowUpdated) for e in events):
            data = sock.recv(65536)
            assert data, "the server closed the connection"
            events += conn.receive_data(data)
    return events


def test_hypercorn_advertises_large_receive_windows(stack: Stack) -> None:
    broker = stack.broker("connectors: []\n")
    events = handshake(int(broker.url.rsplit(":", 1)[1]))
    (settings,) = [e for e in events if isinstance(e, h2.events.RemoteSettingsChanged)]
    window = settings.changed_settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE]
    assert window.new_value == STREAM_WINDOW
    (update,) = [e for e in events if isinstance(e, h2.events.WindowUpdated)]
    assert update.stream_id == 0
    assert update.delta == CONNECTION_WINDOW_EXTRA


def test_an_untested_hypercorn_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hypercorn_fixes, "version", lambda name: "0.99.0")
    with pytest.raises(hypercorn_fixes.UnsupportedHypercorn, match=r"hypercorn 0\.99\.0 is untested"):
        hypercorn_fixes.install(lambda scope, receive, send: None)  # type: ignore[arg-type,return-value]


def test_building_the_app_patches_nothing() -> None:
    from hypercorn.protocol.h2 import H2Protocol

    from broker.server import create_app
    from broker.settings import Settings

    if getattr(H2Protocol, "_remotellm_patched", False):
        pytest.skip("an earlier test in this process installed the fixes")
    create_app(Settings())
    assert not getattr(H2Protocol, "_remotellm_patched", False)


def test_data_of_a_stream_refused_while_shutting_down_goes_nowhere() -> None:
    """A request whose HEADERS and DATA arrive together on a broker shutting down: hypercorn
    resets the stream and, unpatched, fails on its DATA (KeyError), ending serve() with exit 1."""
    from hypercorn.asyncio.task_group import TaskGroup
    from hypercorn.asyncio.worker_context import WorkerContext
    from hypercorn.config import Config
    from hypercorn.events import Closed, RawData
    from hypercorn.protocol.h2 import H2Protocol
    from hypercorn.typing import ConnectionState

    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("a refused stream reached the app")

    hypercorn_fixes.install(app)  # type: ignore[arg-type]

    async def main() -> list[h2.events.Event]:
        context = WorkerContext(None)
        await context.terminated.set()
        sent: list[object] = []

        async def send(event: object) -> None:
            sent.append(event)

        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        headers = [(":method", "POST"), (":path", "/tunnel/v1/reply"), (":scheme", "http"), (":authority", "b")]
        client.send_headers(1, headers)
        client.send_data(1, b"frames", end_stream=True)
        async with TaskGroup(asyncio.get_running_loop()) as group:
            server = H2Protocol(app, Config(), context, group, ConnectionState({}), False, None, None, send)  # type: ignore[arg-type]
            await server.initiate()
            await server.handle(RawData(data=client.data_to_send()))
            await server.handle(Closed())
        return client.receive_data(b"".join(e.data for e in sent if isinstance(e, RawData)))

    events = asyncio.run(main())
    assert any(isinstance(e, h2.events.StreamReset) and e.stream_id == 1 for e in events)


async def _serve_briefly(
    app: object, *, keep_alive: float, graceful: float, scenario: Callable[[int], Awaitable[None]]
) -> float:
    """Serve ``app`` with the fixes installed on a free port, run ``scenario(port)`` against
    it, then shut down; returns how long serve() took to return after the trigger."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.keep_alive_timeout = keep_alive
    config.graceful_timeout = graceful
    port = free_port()
    config.bind = [f"127.0.0.1:{port}"]
    stop = asyncio.Event()
    server = asyncio.ensure_future(serve(hypercorn_fixes.install(app), config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    try:
        for _ in range(500):  # bounded: until it listens
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.01)
                continue
            writer.close()
            break
        await scenario(port)
    finally:
        stop.set()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(server, 60)
    return loop.time() - started


async def _ok(scope: dict[str, object], receive: object, send: Callable[[dict[str, object]], Awaitable[None]]) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


_Send = Callable[[dict[str, object]], Awaitable[None]]
_GET = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(_GET)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return head + await asyncio.wait_for(reader.readexactly(2), 10)


def test_an_idle_connection_closes_after_the_keep_alive_timeout_and_a_busy_one_does_not() -> None:
    """The idle timeout runs on a timer: it closes a connection idle past keep_alive_timeout,
    restarts after each request, and is off while a request is in flight (this one takes
    three timeouts' worth)."""
    release = asyncio.Event()

    async def app(scope: dict[str, object], receive: object, send: _Send) -> None:
        if scope.get("path") == "/slow":
            await asyncio.wait_for(release.wait(), 30)
        await _ok(scope, receive, send)

    async def scenario(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await _get(reader, writer)).endswith(b"ok")
        writer.write(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        await asyncio.sleep(0.6)  # three keep-alive timeouts, busy all along
        release.set()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200") and await asyncio.wait_for(reader.readexactly(2), 10) == b"ok"
        assert await asyncio.wait_for(reader.read(), 10) == b"", "the idle connection was not closed"
        writer.close()

    asyncio.run(_serve_briefly(app, keep_alive=0.2, graceful=30, scenario=scenario))


def test_idle_connections_close_at_once_when_the_server_terminates() -> None:
    """A keep-alive connection left idle does not hold up shutdown: it closes when the server
    terminates, not after the keep-alive timeout (1,000 s) or the graceful timeout (60 s)."""
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def scenario(port: int) -> None:
        for _ in range(3):
            conns.append(await asyncio.open_connection("127.0.0.1", port))
            assert (await _get(*conns[-1])).endswith(b"ok")

    async def main() -> float:
        took = await _serve_briefly(_ok, keep_alive=1000, graceful=60, scenario=scenario)
        for reader, writer in conns:
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
        return took

    assert asyncio.run(main()) < 30  # far below the graceful timeout that would end it otherwise


def _chunked_app(record: list[object]) -> Callable[..., Awaitable[None]]:
    """Streams a reply: head by ASGI, chunks by the chunk writer (``record`` gets what it
    answered), the end by ASGI; ``/sized`` declares a length, so no chunk can be chunked."""

    async def app(scope: dict[str, object], receive: object, send: _Send) -> None:
        if scope["type"] != "http":
            return
        write = chunk_writer(scope)
        assert write is not None, "no chunk writer on an HTTP/1.1 stream"
        record.append(await write(b"early"))  # before the head
        sized = scope["path"] == "/sized"
        headers = [(b"content-length", b"5")] if sized else []
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for data in (b"hello", b"", b"x" * 300):  # (an empty chunk would end the body: none is written)
            taken = await write(data)
            record.append(taken)
            if not taken:
                await send({"type": "http.response.body", "body": data[:5], "more_body": True})
                break
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def test_chunks_go_straight_to_the_connection_framed_as_h11_frames_them() -> None:
    """A streamed HTTP/1.1 body's chunks written by the chunk writer arrive framed exactly as
    h11 frames them, between a head and an end that went through ASGI, and the connection
    stays usable for the next request; before the head the writer declines. The first chunk
    is written in the step that sent the head, while the head waits in the cork: it goes after."""
    record: list[object] = []
    replies: list[bytes] = []

    async def scenario(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):  # the second request proves h11's state survived the first
            writer.write(_GET)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
            replies.append(await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10))
        writer.close()

    asyncio.run(_serve_briefly(_chunked_app(record), keep_alive=30, graceful=30, scenario=scenario))
    assert replies == [b"5\r\nhello\r\n12c\r\n" + b"x" * 300 + b"\r\n0\r\n\r\n"] * 2
    assert record == [False, True, True, True] * 2


def test_the_chunk_writer_declines_a_body_that_is_not_chunked() -> None:
    """A reply with a length (or a HEAD's) is no chunked body: the writer writes nothing and
    says so, and ASGI sends the body as before."""
    record: list[object] = []
    replies: list[bytes] = []

    async def scenario(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /sized HTTP/1.1\r\nhost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        replies.append(head.split(b"\r\n")[0] + await asyncio.wait_for(reader.readexactly(5), 10))
        writer.write(b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        replies.append(head.split(b"\r\n")[0])
        writer.close()

    asyncio.run(_serve_briefly(_chunked_app(record), keep_alive=30, graceful=30, scenario=scenario))
    assert replies == [b"HTTP/1.1 200 hello", b"HTTP/1.1 200 "]
    assert record == [False, False] * 2


def test_the_chunk_writer_declines_once_the_user_has_gone() -> None:
    """A user who hangs up mid-stream: the writer raises nothing, and soon declines (the
    stream is closed), so a relay writing to it ends."""
    outcome: list[object] = []
    gone = asyncio.Event()

    async def app(scope: dict[str, object], receive: object, send: _Send) -> None:
        write = chunk_writer(scope)
        assert write is not None
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.wait_for(gone.wait(), 10)
        for sent in range(100_000):  # bounded; each pass yields to the loop, which sees the hang-up
            await asyncio.sleep(0.001)
            if not await write(b"tick"):
                outcome.append(sent)
                return
        outcome.append("never declined")

    async def scenario(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_GET)
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.transport.abort()
        gone.set()
        for _ in range(10_000):  # bounded: until the app has seen it
            if outcome:
                break
            await asyncio.sleep(0.001)

    asyncio.run(_serve_briefly(app, keep_alive=30, graceful=30, scenario=scenario))
    assert len(outcome) == 1 and isinstance(outcome[0], int), outcome


def test_a_closed_connection_is_freed_without_the_cycle_collector() -> None:
    """hypercorn's parts of a connection refer to one another, so each closed connection
    used to wait for a full collection (scanning every live stream: a pause of tens of ms
    in a burst). Now nothing of a connection, its requests or their chunk writers is left
    for the collector."""
    record: list[object] = []

    async def scenario(port: int) -> None:
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(2):  # keep-alive: two requests per connection
                writer.write(_GET)
                await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10)
            writer.close()
            await writer.wait_closed()

    gc.collect()
    gc.disable()  # nothing is collected behind the test's back
    try:
        asyncio.run(_serve_briefly(_chunked_app(record), keep_alive=30, graceful=30, scenario=scenario))
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = {type(o).__qualname__ for o in gc.garbage} & _CONNECTION_PARTS
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert record.count(True) == 18, record  # the chunk writer served every request
    assert not left, f"left for the cycle collector: {sorted(left)}"


# (The server's own parts, such as its Config and Lifespan, live as long as it does.)
_CONNECTION_PARTS = {"TCPServer", "ProtocolWrapper", "H11Protocol", "Connection", "HTTPStream", "ChunkWriter"}
_CONNECTION_PARTS |= {"IdleTimer", "CorkedWriter", "StreamReader", "StreamWriter"}
