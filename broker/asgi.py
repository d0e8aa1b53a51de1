"""Plain ASGI plumbing shared by the endpoints (no BaseHTTPMiddleware on the hot path)."""

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# A server extension on HTTP/1.1 streams: hypercorn_fixes.ChunkWriter.
CHUNKS_EXTENSION = "remotellm.chunks"


class SendChunk(Protocol):
    """Writes a streamed body's chunk straight to the user's connection. Each returns False,
    having written nothing, when it cannot (then ASGI's send does it)."""

    async def __call__(self, data: bytes) -> bool:
        """Write, then wait while the user is slow to take it."""

    def write_nowait(self, data: bytes) -> bool:
        """Write only if no wait can follow (False also when the user is slow: call the other)."""


def chunk_writer(scope: Scope) -> SendChunk | None:
    writer: SendChunk | None = scope.get("extensions", {}).get(CHUNKS_EXTENSION)
    return writer


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class ClientGone(Exception):
    """The client disconnected before its request was complete."""


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None once it exceeds ``limit`` (the rest stays unread)."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)
