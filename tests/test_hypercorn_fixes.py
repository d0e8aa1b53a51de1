"""broker.hypercorn_fixes against a real hypercorn: what it advertises, and what it refuses."""

import asyncio
import socket

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from broker import hypercorn_fixes
from broker.hypercorn_fixes import CONNECTION_WINDOW_EXTRA, STREAM_WINDOW
from tests.support import Stack


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
