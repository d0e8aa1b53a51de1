"""A request body streamed on through the tunnel as it arrives, never held whole."""

import asyncio

from broker.asgi import Message, Receive
from broker.body import BodyRefused, too_large, too_slow
from broker.tunnel import Exchange, Interrupt

_GONE: Message = {"type": "http.disconnect"}
# Body frames carry at least this much (but the last), whatever pieces the user sends:
# each frame costs ~30 bytes and work on both sides, and a place among the frames a
# session may leave unacknowledged (a session past that bound is given up).
MIN_PIECE = 16 * 1024


class Upload:
    """The rest of a user's body, after the head the broker read to route it.

    ``receive`` stands in for the ASGI one in the relay's disconnect watcher: its first
    call waits until the request is open at a connector, forwards the rest of the body
    within the connector's credit (the user's connection is not read while the LLM is
    slower, so back-pressure reaches the user through TCP and HTTP/2 windows), and only
    then behaves as the plain ``receive``. A user who leaves mid-body reads as a disconnect.
    """

    def __init__(self, receive: Receive, *, head: int, limit: int, timeout: float, deadline: float) -> None:
        self._receive = receive
        self._head = head  # bytes read before routing, sent with the request
        self._limit = limit
        self._timeout = timeout
        self._deadline = deadline  # loop time by which the whole body must have arrived
        self._opened: asyncio.Future[Exchange] = asyncio.get_running_loop().create_future()
        self._forwarded = False
        self.streamed = 0  # bytes after the head
        self.refused: BodyRefused | None = None  # too large or too slow: the request is interrupted

    @property
    def deadline(self) -> float:
        """Loop time by which the whole body must have arrived (the LLM answers after it)."""
        return self._deadline

    def opened(self, exchange: Exchange) -> None:
        """The request is open at a connector: the rest of the body may go."""
        if not self._opened.done():
            self._opened.set_result(exchange)

    async def receive(self) -> Message:
        if self._forwarded:
            return await self._receive()
        exchange = await self._opened
        self._forwarded = True
        if not await self._forward(exchange):
            return _GONE
        return await self._receive()

    async def _forward(self, exchange: Exchange) -> bool:
        """Send the rest of the body; False if the user left before it was all there."""
        try:
            async with asyncio.timeout_at(self._deadline):
                more, pending = True, bytearray()
                while more:
                    message = await self._receive()
                    if message["type"] == "http.disconnect":
                        return False
                    chunk = message.get("body", b"")
                    more = bool(message.get("more_body", False))
                    self.streamed += len(chunk)
                    if self._head + self.streamed > self._limit:
                        raise too_large(self._limit)
                    pending += chunk
                    if len(pending) >= MIN_PIECE or not more:
                        await exchange.send_body(bytes(pending), more=more)
                        pending.clear()
        except TimeoutError:
            self.refused = too_slow(self._timeout)
        except BodyRefused as exc:
            self.refused = exc
        if self.refused is not None:
            exchange.events.put_nowait(Interrupt("body_refused"))
        return True
