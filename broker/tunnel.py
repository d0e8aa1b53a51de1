"""A connector's session on the broker: the I/O around its BrokerConnection state machine.

The poll endpoint writes what ``next_write`` returns; uplink endpoints feed ``receive``;
each relay waits on its ``Exchange``'s event queue. The protocol's rules live in
wire.protocol; this class only moves bytes and wakes the tasks that wait for them.
"""

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from broker.config import ConnectorSpec
from wire import (
    ACK_DELAY,
    BrokerConnection,
    Chunk,
    Coalescer,
    Credit,
    Drain,
    End,
    Frame,
    Head,
    Hello,
    Inbound,
    Limits,
    Pong,
    ProtocolError,
    Slots,
)
from wire.frames import Headers

log = logging.getLogger("remotellm.tunnel")

Interruption = Literal["connector_lost", "user_gone", "protocol_error", "body_refused"]
VIOLATIONS_LOGGED_EVERY = 1000


class Interrupt:
    """Queued into an exchange when something outside its reply ends it."""

    __slots__ = ("reason",)

    def __init__(self, reason: Interruption) -> None:
        self.reason = reason


ReplyEvent = Head | Chunk | End | Interrupt
Sink = Callable[[Chunk], bool]  # takes a chunk at once, or declines it (False)


class Events:
    """An exchange's reply events, in order, for the one task that waits on them.

    What the relay uses of an asyncio.Queue, at a fraction of its cost per event (a
    streamed reply has thousands): no task accounting, no putters, one waiter at most.
    """

    __slots__ = ("_items", "_loop", "_sink", "_waiter")

    def __init__(self) -> None:
        self._items: deque[ReplyEvent] = deque()
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Sink | None = None

    def deliver_to(self, sink: Sink | None) -> None:
        """While set, a Chunk that comes while the task waits goes to ``sink`` at once, unless
        it returns False; then it is queued as usual. Waking the task costs more than most
        chunks' whole relay."""
        self._sink = sink

    def put_nowait(self, event: ReplyEvent) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():  # the task is busy (or not waiting yet): in order
            self._items.append(event)
            return
        sink = self._sink  # (a waiting task means an empty queue: nothing to overtake)
        if sink is not None and type(event) is Chunk and self._sunk(sink, event):
            return
        self._items.append(event)
        waiter.set_result(None)

    @staticmethod
    def _sunk(sink: Sink, chunk: Chunk) -> bool:
        # The sink runs in the uplink's dispatch: a bug in it must fail its own request (the
        # relay gets the chunk), not the other frames of the same uplink read.
        try:
            return sink(chunk)
        except Exception:
            log.exception("request %d: a chunk's sink failed", chunk.id)
            return False

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> ReplyEvent:
        """The next event; IndexError if there is none."""
        return self._items.popleft()

    async def get(self) -> ReplyEvent:
        while not self._items:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class Exchange:
    """One request in flight on one connector."""

    __slots__ = ("credit", "events", "id", "session")

    def __init__(self, session: "Session", request_id: int) -> None:
        self.id = request_id
        self.session = session
        self.events = Events()
        self.credit = asyncio.Event()  # set when the connector grants room for more body

    def consumed(self, size: int) -> None:
        """The user took ``size`` bytes of the reply: the one way credit goes back."""
        self.session.consumed(self.id, size)

    async def send_body(self, data: bytes, *, more: bool) -> None:
        """Send more of a streamed body, waiting whenever the connector's credit runs out
        (forever once the request is over: the caller cancels the wait)."""
        conn = self.session.conn
        while True:
            self.credit.clear()  # before reading the room, so a grant in between is not missed
            room = conn.upload_room(self.id)
            if len(data) <= room:
                break
            if room:
                self.session.send_body(self.id, data[:room], more=True)
                data = data[room:]
            else:
                await self.credit.wait()
        if data or not more:
            self.session.send_body(self.id, data, more=more)


class Session:
    """A registered connector instance: from register until it leaves, is revoked, replaced,
    or stays away longer than the resume grace. Its polls and uplinks may come and go."""

    def __init__(self, spec: ConnectorSpec, hello: Hello, limits: Limits) -> None:
        self.credential = secrets.token_urlsafe(32)  # the resume credential: never logged
        self.spec = spec
        self.hello = hello
        self.offered: frozenset[str] = frozenset()  # what the connector can serve
        self.refused: frozenset[str] = frozenset()  # what it offered but may not serve
        self.protocol = "?"
        self.connected_at = time.time()
        self.conn = BrokerConnection(limits)
        self.exchanges: dict[int, Exchange] = {}
        self.poll_generation = 0
        self.polling = False
        self.detached_since = time.monotonic()  # no poll since then
        self.last_seen = time.monotonic()  # any sign of life: a poll, an uplink byte
        self.leaving = False  # the connector or the broker said goodbye: no new requests
        self.closed = False
        self.uplinks = 0  # uplink bodies open now
        self._after_cancel: dict[int, Callable[[End], None]] = {}  # who wants a cancelled request's End
        self.violations = 0  # request-level protocol errors so far
        self.round_trip: float | None = None  # seconds from a Ping to its Pong, the last one
        self._wake = asyncio.Event()
        self._coalescer = Coalescer()
        self._ack_by: float | None = None  # when an acknowledgement owed must leave
        self.free_slots: int | None = None  # the connector's last report, all its brokers together
        # Requests opened here since the connector's last report, still open: that report may
        # not count them, and one that ends before any report must not count for ever.
        self._unreported: set[int] = set()
        if spec.max_concurrent is not None:
            self.conn.capacity(self.max_concurrent)  # first of all: the connector holds it over every broker

    @property
    def in_flight(self) -> int:
        """Requests of this broker in flight on the connector."""
        return len(self.exchanges)

    # Endpoint protocol of the router
    @property
    def occupied(self) -> int:
        """Requests in flight on the connector, all its brokers together, as far as this broker
        knows: its last report of free slots, less the requests opened here since (a guess that
        may be short, which the connector's ``busy`` refusal corrects)."""
        local = len(self.exchanges)
        if self.free_slots is None:
            return local
        return max(local, self.max_concurrent - self.free_slots + len(self._unreported))

    @property
    def max_concurrent(self) -> int:
        """The configured cap (none by default: the LLM queues), never past the stream limit."""
        configured, streams = self.spec.max_concurrent, self.conn.limits.max_streams
        return streams if configured is None else min(configured, streams)

    @property
    def name(self) -> str:
        return self.spec.name

    # --- what the session is ------------------------------------------------

    def renew(self, spec: ConnectorSpec) -> None:
        """The token's entry after a reload (its key, allowlist or limits may have changed)."""
        changed = spec.max_concurrent != self.spec.max_concurrent
        self.spec = spec
        if changed:
            self.free_slots = None if spec.max_concurrent is None else self.free_slots
            self._intent(self.conn.capacity, None if spec.max_concurrent is None else self.max_concurrent)

    def offer(self, models: frozenset[str]) -> None:
        """What the connector can serve (from its Hello, or listed from its LLM)."""
        self.offered = models

    def refuse(self, models: frozenset[str]) -> bool:
        """Offered models it may not serve; True when that set changed (worth a log line)."""
        changed = models != self.refused
        self.refused = models
        return changed

    def leave(self) -> None:
        """Route nothing new here: the connector or this broker is leaving."""
        self.leaving = True

    # --- requests -----------------------------------------------------------

    def open(
        self, method: str, path: str, query: str, headers: Headers, body: bytes, *, more_body: bool = False
    ) -> Exchange:
        """Send a request to the connector, with this connector's LLM key (an exchange that
        is over at once if the session cannot take it); with ``more_body`` the rest of the
        body follows through ``Exchange.send_body``."""
        try:
            request_id = self.conn.open(method, path, query, headers, body, self.spec.llm_api_key, more_body=more_body)
        except ProtocolError as exc:
            self._give_up(exc)
            exchange = Exchange(self, 0)
            exchange.events.put_nowait(Interrupt("connector_lost"))
            return exchange
        exchange = self.exchanges[request_id] = Exchange(self, request_id)
        if self.free_slots is not None:
            self._unreported.add(request_id)
        self._wake.set()
        return exchange

    def finish(self, exchange: Exchange, *, cancel: bool, on_end: Callable[[End], None] | None = None) -> None:
        self._unreported.discard(exchange.id)
        if self.exchanges.pop(exchange.id, None) is not None and cancel and not self.closed:
            self._intent(self.conn.cancel, exchange.id)
            if on_end is not None:  # (bounded: the protocol tracks every cancelled call until its End)
                self._after_cancel[exchange.id] = on_end

    def consumed(self, request_id: int, size: int) -> None:
        self._intent(self.conn.consumed, request_id, size)

    def send_body(self, request_id: int, data: bytes, *, more: bool) -> None:
        self._intent(lambda: self.conn.send_body(request_id, data, more=more))

    def models(self, models: list[str]) -> None:
        self._intent(self.conn.models, models)

    def brokers(self, brokers: list[tuple[str, str]]) -> None:
        self._intent(self.conn.brokers, brokers)

    def drain(self, reason: str) -> None:
        """This broker is leaving: no new requests; the connector is told to go elsewhere."""
        self.leave()
        self._intent(self.conn.drain, reason)

    def _intent(self, intent: Callable[..., None], *args: Any) -> None:
        """Queue a frame and wake the poll; a connector that has acknowledged nothing for
        ``max_unacked`` frames is given up on."""
        try:
            intent(*args)
        except ProtocolError as exc:
            self._give_up(exc)
            return
        if self.conn.wants_write:  # (most consumed bytes queue no Credit yet: no wake-up)
            self._wake.set()

    def _give_up(self, exc: ProtocolError) -> None:
        log.warning("connector %s: %s; its session ends", self.name, exc)
        self.close()  # (the reaper drops it)

    # --- the poll -------------------------------------------------------------

    def attach_poll(self, received: int, protocol: str) -> int:
        """A new poll takes over, saying how many frames the connector has; everything
        after those goes out again on it. Raises ProtocolError on an impossible count."""
        self.conn.acknowledge(received)
        self.protocol = protocol
        self.conn.rewind()
        self.poll_generation += 1
        self.polling = True
        self.touch()
        self._wake.set()
        return self.poll_generation

    def detach_poll(self, generation: int) -> None:
        """The poll of this generation is over (or its connection gone): the resume grace runs."""
        if generation == self.poll_generation and self.polling:
            self.polling = False
            self.detached_since = time.monotonic()
            self._wake.set()

    def first_write(self) -> bytes:
        """At once when a poll opens: some proxies hold the response head until body bytes flow."""
        return self._write(force=True)

    async def next_write(self, generation: int, idle: float, until: float) -> bytes | None:
        """The next write for the poll of this generation: frames as soon as there are any
        (acknowledgements a little later), a Ping after ``idle`` seconds of silence, None
        once the poll is over (replaced, closed, or past ``until``)."""
        conn = self.conn
        deadline = min(time.monotonic() + idle, until)
        while not conn.wants_write and not self.closed and self._current(generation):
            if not await self._wait(min(deadline, self._ack_deadline())):
                break
        if self.closed or not self._current(generation):
            return None
        if conn.wants_write:
            await self._coalesce()
        elif not conn.ack_owed:
            if time.monotonic() >= until:
                return None
            if not conn.ping(time.time()):
                return self._write(force=True)  # the last Ping is unanswered: a keepalive
        return self._write()

    def _write(self, *, force: bool = False) -> bytes:
        self._ack_by = None  # (every write acknowledges what arrived)
        return self.conn.data_to_send(force=force)

    def _ack_deadline(self) -> float:
        """When what arrived must be acknowledged, at the latest (inf: nothing owed)."""
        if not self.conn.ack_owed:
            return float("inf")
        if self._ack_by is None:
            self._ack_by = time.monotonic() + ACK_DELAY
        return self._ack_by

    async def _wait(self, until: float) -> bool:
        """Wait for a wake-up until ``until`` (monotonic); False once that time came."""
        remaining = until - time.monotonic()
        if remaining <= 0:
            return False
        self._wake.clear()  # a wake-up that brought nothing for this poll: wait on
        try:
            async with asyncio.timeout(remaining):
                await self._wake.wait()
        except TimeoutError:
            return False
        return True

    async def _coalesce(self) -> None:
        """Hold a write that follows the last one closely, so frames ready meanwhile join it."""
        delay = self._coalescer.delay(time.monotonic())
        if delay:
            await asyncio.sleep(delay)
        self._coalescer.wrote(time.monotonic())

    def _current(self, generation: int) -> bool:
        return generation == self.poll_generation and self.polling

    # --- the uplink -------------------------------------------------------------

    def inbound(self) -> Inbound | None:
        """A reader for one new uplink body; None past the limit of bodies open at once
        (``done_inbound`` gives the place back)."""
        if self.uplinks >= self.conn.limits.max_uplinks:
            return None
        self.uplinks += 1
        return self.conn.inbound()

    def done_inbound(self) -> None:
        self.uplinks -= 1

    def receive(self, reader: Inbound, data: bytes) -> list[Drain | Slots]:
        """Frames from an uplink go to their exchanges; returns the Drains, and the Slots
        reports that give the connector more room, for the caller. A broken request fails
        alone; raises ProtocolError when the session is at fault."""
        self.touch()
        notices: list[Drain | Slots] = []
        owed = self.conn.ack_owed
        reader.feed_each(data, lambda event: self._dispatch(event, notices), self._violated)
        if self.conn.ack_owed and not owed:  # the poll writer learns an acknowledgement is due
            self._wake.set()
        return notices

    def _dispatch(self, event: Frame, notices: list[Drain | Slots]) -> None:
        kind = type(event)
        if kind is Chunk or kind is Head or kind is End:
            if kind is End and event.error == "busy":  # type: ignore[union-attr]
                self._report_free(0)  # full, whatever this broker thought: route elsewhere until it says
            exchange = self.exchanges.get(event.id)  # type: ignore[union-attr]
            if exchange is not None:  # (None: the relay gave up on it, its Cancel is out)
                exchange.events.put_nowait(event)  # type: ignore[arg-type]
            elif kind is End and (ended := self._after_cancel.pop(event.id, None)) is not None:  # type: ignore[union-attr]
                ended(event)  # type: ignore[arg-type]
        elif kind is Credit:
            exchange = self.exchanges.get(event.id)  # type: ignore[union-attr]
            if exchange is not None:
                exchange.credit.set()
        elif kind is Pong:
            if event.ping_sent:  # type: ignore[union-attr]  # (0: before any Ping)
                self.round_trip = time.time() - event.ping_sent  # type: ignore[union-attr]
            self.conn.ping(time.time())  # echoed at once: the connector's proof its uploads arrive
            self._wake.set()
        elif kind is Drain:
            notices.append(event)  # type: ignore[arg-type]
        elif kind is Slots:
            before = self.max_concurrent - self.occupied
            self._report_free(event.free)  # type: ignore[union-attr]
            if self.max_concurrent - self.occupied > before:  # more room: worth waking the queue for
                notices.append(event)  # type: ignore[arg-type]

    def _report_free(self, free: int) -> None:
        if self.spec.max_concurrent is not None:  # (no cap here: nothing to track)
            self.free_slots = min(free, self.max_concurrent)
            self._unreported.clear()

    def _violated(self, exc: ProtocolError) -> None:
        assert exc.request_id is not None
        self.violations += 1
        if self.violations == 1 or self.violations % VIOLATIONS_LOGGED_EVERY == 0:  # a flood is not a log flood
            log.warning("connector %s broke the protocol (%d times): %s", self.name, self.violations, exc)
        self.conn.cancel(exc.request_id)
        self._wake.set()
        exchange = self.exchanges.get(exc.request_id)
        if exchange is not None:
            exchange.events.put_nowait(Interrupt("protocol_error"))

    def touch(self) -> None:
        self.last_seen = time.monotonic()

    def close(self) -> None:
        """The connector is gone for good: every request in flight fails now."""
        self.closed = True
        self._after_cancel.clear()
        self._wake.set()
        for exchange in self.exchanges.values():
            exchange.events.put_nowait(Interrupt("connector_lost"))
