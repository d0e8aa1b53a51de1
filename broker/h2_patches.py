"""Two small, version-checked patches to hypercorn's HTTP/2 protocol.

- **Reset cut streams.** hypercorn (checked on 0.17 and 0.18) just forgets a stream whose
  ASGI app ended without finishing its response: no END_STREAM, no RST_STREAM. The client
  waits until the whole connection idles out, and every other stream on it dies with it.
  The relay ends a broken response this way on purpose (a truncated stream must not look
  complete), so such a stream is reset instead.
- **Larger receive windows.** hypercorn advertises HTTP/2's default 64 KiB windows and
  offers no setting; a connector's uplink, which carries every reply of the connector,
  then stalls for tens of milliseconds at a time. Streams get 4 MiB and the connection
  16 MiB more. Memory stays bounded: the relay reads every upload at once and the
  per-request credit bounds what each reply may send ahead.
"""

import contextlib
import logging
from importlib.metadata import version
from typing import Any

import h2.errors
import h2.exceptions
import h2.settings
import priority.priority
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h2 import H2Protocol

log = logging.getLogger("remotellm.broker")

TESTED_VERSIONS = ("0.17.", "0.18.")
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW_EXTRA = 16 * 1024 * 1024


def install() -> bool:
    """Patch hypercorn's H2Protocol once; False (and a warning) on an untested version."""
    if getattr(H2Protocol, "_remotellm_patched", False):
        return True
    hypercorn_version = version("hypercorn")
    if not hypercorn_version.startswith(TESTED_VERSIONS):
        log.warning("hypercorn %s is untested: HTTP/2 patches not applied", hypercorn_version)
        return False
    _reset_cut_streams()
    _enlarge_windows()
    H2Protocol._remotellm_patched = True  # type: ignore[attr-defined]
    return True


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


def _enlarge_windows() -> None:
    original_init = H2Protocol.__init__
    original_initiate = H2Protocol.initiate

    def __init__(self: H2Protocol, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        # A fresh Settings object: values assigned to an existing one stay pending (unsent).
        current: dict[Any, int] = dict(self.connection.local_settings)
        self.connection.local_settings = h2.settings.Settings(
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

    H2Protocol.__init__ = __init__  # type: ignore[method-assign]
    H2Protocol.initiate = initiate  # type: ignore[method-assign]
