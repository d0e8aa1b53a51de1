"""Reset an HTTP/2 stream whose ASGI app ended without finishing its response.

hypercorn (checked on 0.17 and 0.18) just forgets such a stream: no END_STREAM, no
RST_STREAM. The client then waits until the whole connection idles out, and every other
stream on that connection dies with it. The relay ends a broken response this way on
purpose (a truncated stream must not look complete), so the stream is reset instead.
"""

import contextlib
import logging
from importlib.metadata import version
from typing import Any

import h2.errors
import h2.exceptions
import priority.priority
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h2 import H2Protocol

log = logging.getLogger("remotellm.broker")

TESTED_VERSIONS = ("0.17.", "0.18.")


def install() -> bool:
    """Patch hypercorn's H2Protocol once; False (and a warning) on an untested version."""
    if getattr(H2Protocol.stream_send, "_remotellm_reset", False):
        return True
    hypercorn_version = version("hypercorn")
    if not hypercorn_version.startswith(TESTED_VERSIONS):
        log.warning("hypercorn %s is untested: broken HTTP/2 streams will not be reset", hypercorn_version)
        return False
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

    stream_send._remotellm_reset = True  # type: ignore[attr-defined]
    H2Protocol.stream_send = stream_send  # type: ignore[method-assign]
    return True
