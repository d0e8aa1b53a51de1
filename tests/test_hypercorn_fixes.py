"""broker.hypercorn_fixes against a real hypercorn: what it advertises, and what it refuses."""

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
