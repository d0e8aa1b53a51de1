"""Plain ASGI plumbing shared by the endpoints (no BaseHTTPMiddleware on the hot path)."""

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# An upload we refuse is still read to its end, for at most this long.
BODY_DRAIN_TIMEOUT = 10.0


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
