"""A connector's session on the broker: its outbound frames and its requests in flight.

The poll endpoint drains ``Session.outbox``; reply endpoints feed ``Session.deliver``;
the relay waits on each ``Exchange``'s event queue. All three meet only here.
"""

import asyncio
import itertools
import secrets
import time
from typing import Literal

from broker.config import ConnectorSpec
from wire import INITIAL_CREDIT, Cancel, Chunk, End, Frame, Head, Hello, Ping, Request
from wire.frames import Headers

_request_ids = itertools.count(1)

Interruption = Literal["connector_lost", "user_gone", "credit_overrun"]

# Reply bytes a connector may have sent beyond what the user read before the broker
# gives up on it: its credit, and as much again for frames already on the way.
MAX_AHEAD = 2 * INITIAL_CREDIT


class Interrupt:
    """Queued into an exchange when something outside its reply ends it."""

    __slots__ = ("reason",)

    def __init__(self, reason: Interruption) -> None:
        self.reason = reason


ReplyEvent = Head | Chunk | End | Interrupt


class Exchange:
    """One request in flight on one connector."""

    __slots__ = ("buffered", "events", "id", "session")

    def __init__(self, session: "Session") -> None:
        self.id = next(_request_ids)
        self.session = session
        self.events: asyncio.Queue[ReplyEvent] = asyncio.Queue()
        self.buffered = 0  # body bytes received, not yet sent to the user


class Session:
    """A registered connector instance, from register until it is lost, reaped, revoked,
    replaced by its own re-registration, or leaves."""

    def __init__(self, spec: ConnectorSpec, hello: Hello) -> None:
        self.id = secrets.token_urlsafe(18)
        self.spec = spec
        self.hello = hello
        self.offered: frozenset[str] = frozenset()  # what the connector can serve
        self.refused: frozenset[str] = frozenset()  # what it offered but may not serve
        self.protocol = "?"
        self.connected_at = time.time()
        self.in_flight = 0
        self.exchanges: dict[int, Exchange] = {}
        self.poll_generation = 0
        self.polling = False
        self.unpolled_since = time.monotonic()
        self.last_seen = time.monotonic()  # any sign of life: a poll, a reply, a heartbeat
        self.leaving = False  # the connector said goodbye: no new requests
        self.last_pong = 0.0
        self.closed = False
        self._outbox: list[Frame] = []
        self._wake = asyncio.Event()

    # Endpoint protocol of the router
    @property
    def max_concurrent(self) -> int:
        return self.spec.max_concurrent

    @property
    def name(self) -> str:
        return self.spec.name

    def send(self, frame: Frame) -> None:
        self._outbox.append(frame)
        self._wake.set()

    def ping(self) -> Ping:
        return Ping(time.time(), self.last_pong)

    def touch(self) -> None:
        self.last_seen = time.monotonic()

    def attach_poll(self) -> int:
        """A new poll takes over; the previous one (if any) ends after its current write."""
        self.poll_generation += 1
        self.polling = True
        self.touch()
        self._wake.set()
        return self.poll_generation

    def detach_poll(self, generation: int) -> None:
        if generation == self.poll_generation:
            self.polling = False
            self.unpolled_since = time.monotonic()

    async def next_frames(self, generation: int, timeout: float, until: float) -> list[Frame] | None:
        """Frames for the poll of this generation: a Ping after ``timeout`` of silence,
        None once the poll is over (replaced, closed, or past ``until``)."""
        deadline = min(time.monotonic() + timeout, until)
        while not self._outbox and not self.closed and generation == self.poll_generation:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wake.clear()  # a wake-up that brought nothing for this poll: wait on
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                break
        if self.closed or generation != self.poll_generation:
            return None
        frames, self._outbox = self._outbox, []
        if frames:
            return frames
        return None if time.monotonic() >= until else [self.ping()]

    def wake(self) -> None:
        self._wake.set()

    def open(self, method: str, path: str, query: str, headers: Headers, body: bytes) -> Exchange:
        """Send a request to the connector, with this connector's LLM key."""
        exchange = Exchange(self)
        self.exchanges[exchange.id] = exchange
        self.in_flight += 1
        self.send(Request(exchange.id, method, path, query, headers, body, self.spec.llm_api_key))
        return exchange

    def finish(self, exchange: Exchange, *, cancel: bool) -> None:
        if self.exchanges.pop(exchange.id, None) is None:
            return
        self.in_flight -= 1
        if cancel and not self.closed:
            self.send(Cancel(exchange.id))

    def deliver(self, frame: Head | Chunk | End) -> bool:
        """Route a reply frame to its exchange; False if it is not one of ours (any more)."""
        exchange = self.exchanges.get(frame.id)
        if exchange is None:
            return False
        if isinstance(frame, Chunk):
            exchange.buffered += len(frame.data)
            if exchange.buffered > MAX_AHEAD:  # a connector that ignores its credit
                exchange.events.put_nowait(Interrupt("credit_overrun"))
                return True
        exchange.events.put_nowait(frame)
        return True

    def interrupt(self, request_id: int, reason: Interruption) -> None:
        exchange = self.exchanges.get(request_id)
        if exchange is not None:
            exchange.events.put_nowait(Interrupt(reason))

    def close(self) -> None:
        """The connector is gone: every request in flight fails now."""
        self.closed = True
        self._wake.set()
        for request_id in list(self.exchanges):
            self.interrupt(request_id, "connector_lost")
