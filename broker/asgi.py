"""Plain ASGI plumbing shared by the endpoints (no BaseHTTPMiddleware on the hot path)."""

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# A streamed body's chunk written straight to the user's connection, False when it cannot be
# (then ASGI's send does it): a server extension, hypercorn_fixes.ChunkWriter, on HTTP/1.1.
CHUNKS_EXTENSION = "remotellm.chunks"
SendChunk = Callable[[bytes], Awaitable[bool]]


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
