"""broker.h2_patches against a real hypercorn: what it advertises, and what a cut stream does."""

import socket

import h2.config
import h2.connection
import h2.events
import h2.settings

from broker.h2_patches import CONNECTION_WINDOW_EXTRA, STREAM_WINDOW
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
