"""The tunnel protocol as two sans-IO state machines: the broker's side and the connector's.

In the manner of h11's ``Connection`` and h2's ``H2Connection``: the caller feeds the bytes
it read (``Inbound.feed``) and states its intents (``open``, ``send_chunk``, ``cancel``...),
and takes the events to act on and the bytes to write (``data_to_send``). Nothing here
reads a clock, a socket or an event loop.

**Delivery.** A session's frames are numbered in each direction (0, 1, 2...). Every write
opens with a ``Batch(seq, ack)``: ``seq`` numbers the frames after it, ``ack`` tells the
peer how many of its frames arrived. A sender keeps each frame until it is acknowledged;
when a connection is lost the caller opens another and calls ``rewind``, and everything
unacknowledged goes out again. The receiver drops any frame whose number it has already
seen, so nothing is lost and nothing is delivered twice — a request is never run twice.

**A request's life.** Broker → connector: ``Request`` (with ``more_body``, then ``Body``
frames up to a last one); connector → broker: ``Head``, ``Chunk``*, ``End``. ``Cancel``
may cross an ``End`` in flight; the connector answers it with ``End``. Bodies flow within
credit both ways (``Credit``): the receiver grants what its consumer took, in steps of
half a window, and a sender that overruns its window breaks the protocol.

**Errors.** Anything illegal raises ``ProtocolError``, naming the request when one is at
fault. Whether that ends a request or the whole session is the caller's choice.
"""

from collections import deque
from collections.abc import Callable
from enum import Enum

from wire.frames import (
    INITIAL_CREDIT,
    UPLOAD_CREDIT,
    Batch,
    Body,
    Brokers,
    Cancel,
    Capacity,
    Chunk,
    Credit,
    Drain,
    End,
    ErrorKind,
    Frame,
    Head,
    Headers,
    Models,
    Ping,
    Pong,
    Request,
    Slots,
    UsageSource,
)
from wire.framing import MAX_FRAME_SIZE, FrameDecoder, FrameError, encode
from wire.limits import DEFAULT_LIMITS, Limits, check_brokers, check_models

# Frames received are acknowledged at most this much later when nothing else goes out
# to carry the acknowledgement sooner.
ACK_DELAY = 0.02
# Writes that follow one another closer than this are held back to this spacing, so that
# frames ready within it leave together: one write costs tens of microseconds on each
# side, a frame well under one. A write after a quiet spell leaves at once.
COALESCE_WINDOW = 0.001
# Largest write: the frames beyond it wait for the next one (httpcore and hypercorn copy
# the unsent rest of a write for every 16 KiB HTTP/2 frame).
MAX_WRITE = 256 * 1024


class ProtocolError(Exception):
    """A frame or an intent the protocol does not allow; ``request_id`` names the request
    at fault, None when the session as a whole is."""

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message if request_id is None else f"request {request_id}: {message}")
        self.request_id = request_id


class _Window:
    """Credit of one body in one direction, as both ends count it.

    The sender spends ``room``; the receiver counts ``room`` down as bytes arrive (an
    overrun is a violation) and ``owed`` up as its consumer takes them, granting them
    back in steps of half the window.
    """

    __slots__ = ("owed", "room", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.room = size
        self.owed = 0

    def grant(self, size: int, request_id: int) -> None:
        """The receiver granted ``size`` more; never beyond the window it started with."""
        if size <= 0 or self.room + size > self.size:
            raise ProtocolError(f"credit of {size} bytes beyond the window", request_id)
        self.room += size

    def take(self, size: int, request_id: int) -> None:
        """``size`` bytes of body arrived."""
        self.room -= size
        if self.room < 0:
            raise ProtocolError("body sent beyond its credit", request_id)

    def consumed(self, size: int) -> int:
        """The consumer took ``size`` bytes; how much credit to grant now (0: not yet)."""
        self.owed += size
        if self.owed < self.size // 2:
            return 0
        owed, self.owed = self.owed, 0
        self.room += owed
        return owed


class _Endpoint:
    """What both sides share: numbering, acknowledgement, re-sending, and limits."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._unacked: deque[bytes] = deque()  # encoded frames the peer has not acknowledged
        self._first_unacked = 0  # number of _unacked[0]
        self._unwritten: list[bytes] = []  # the tail of _unacked not yet written on this connection
        self._written = 0  # number of _unwritten[0]
        self._received = 0  # frames of the peer received = the next number expected
        self._acked_to_peer = 0  # the last ``ack`` this side wrote
        self.draining = False  # this side sent Drain
        self.peer_draining = False  # the peer sent Drain

    # --- sending ------------------------------------------------------------

    def _send(self, frame: Frame) -> None:
        if len(self._unacked) >= self.limits.max_unacked:
            raise ProtocolError(f"the peer has not acknowledged {len(self._unacked)} frames")
        data = encode(frame)
        self._unacked.append(data)
        self._unwritten.append(data)

    def data_to_send(self, *, force: bool = False, limit: int | None = MAX_WRITE) -> bytes:
        """One write: the frames not yet written on this connection (about ``limit`` bytes
        of them at most), behind a Batch that also acknowledges what arrived. Empty when
        there is nothing to say, unless ``force`` asks for a bare Batch (a first byte for a
        new poll, a keepalive)."""
        if not self._unwritten and self._received == self._acked_to_peer and not force:
            return b""
        header = encode(Batch(self._written, self._received))
        self._acked_to_peer = self._received
        frames = self._unwritten
        if limit is None or len(frames) < 2:
            self._unwritten = []
        else:
            count = size = 0
            while count < len(frames) and size < limit:
                size += len(frames[count])
                count += 1
            frames, self._unwritten = frames[:count], frames[count:]
        self._written += len(frames)
        if not frames:
            return header
        frames.insert(0, header)
        return b"".join(frames)

    @property
    def wants_write(self) -> bool:
        """Frames wait to be written (acknowledgements alone do not count)."""
        return bool(self._unwritten)

    def rewind(self) -> None:
        """A new connection carries this direction: send everything unacknowledged again."""
        self._unwritten = list(self._unacked)
        self._written = self._first_unacked
        self._acked_to_peer = -1  # the new connection has told the peer nothing yet

    @property
    def ack_owed(self) -> int:
        """Frames received and not yet acknowledged (flush soon when non-zero)."""
        return self._received - self._acked_to_peer

    @property
    def received(self) -> int:
        """How many of the peer's frames arrived: what a new poll tells the broker."""
        return self._received

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    def acknowledge(self, count: int) -> None:
        """The peer has received ``count`` frames of this side (from a Batch or a poll header)."""
        sent = self._first_unacked + len(self._unacked)
        if count > sent:
            raise ProtocolError(f"acknowledges {count} frames of {sent} sent")
        drop = count - self._first_unacked
        if drop <= 0:
            return  # old news from an older connection
        for _ in range(drop):
            self._unacked.popleft()
        self._first_unacked = count
        skip = count - self._written
        if skip > 0:  # acknowledged while waiting to be sent again: no need
            del self._unwritten[:skip]
            self._written = count

    def drain(self, reason: str) -> None:
        """This side is leaving: the peer should finish what is in flight, start nothing new."""
        if not self.draining:
            self.draining = True
            self._send(Drain(reason))

    # --- receiving ------------------------------------------------------------

    def inbound(self) -> "Inbound":
        """A reader for one new inbound connection (a poll response, an uplink body)."""
        return Inbound(self, self._max_frame_size())

    def _max_frame_size(self) -> int:
        raise NotImplementedError

    def _receive(self, frame: Frame) -> Frame | None:
        """Apply one new frame of the peer; the event for the caller, or None."""
        raise NotImplementedError


class Coalescer:
    """When the next write may leave: at once after a quiet spell, else ``window`` after the
    previous one (the caller passes its clock)."""

    __slots__ = ("_last", "window")

    def __init__(self, window: float = COALESCE_WINDOW) -> None:
        self.window = window
        self._last = float("-inf")

    def delay(self, now: float) -> float:
        """Seconds to wait before writing (0: write now)."""
        return max(0.0, self._last + self.window - now)

    def wrote(self, now: float) -> None:
        self._last = now


class Inbound:
    """One inbound connection's bytes: its own decoder and numbering, one shared session.

    A frame that breaks the rules raises ProtocolError — after the events of the frames
    before it were returned, as FrameDecoder does. When it names a request, the session
    is still sound: while ``backlogged``, ``feed(b"")`` goes on with the frames that
    followed the bad one.
    """

    __slots__ = ("_backlog", "_decoder", "_endpoint", "_error", "_next")

    def __init__(self, endpoint: _Endpoint, max_frame_size: int) -> None:
        self._endpoint = endpoint
        self._decoder = FrameDecoder(max_frame_size)
        self._next: int | None = None  # the number of the next frame on this connection
        self._backlog: list[Frame] = []  # decoded, not yet applied (after a violation)
        self._error: ProtocolError | None = None  # found, not yet raised

    @property
    def backlogged(self) -> bool:
        """Frames wait behind a violation: call ``feed(b"")`` again."""
        return bool(self._backlog) or self._error is not None

    def feed(self, data: bytes) -> list[Frame]:
        """The events these bytes complete, each new frame once, in order."""
        try:
            frames = self._decoder.feed(data) if data else []
        except FrameError as exc:
            raise ProtocolError(str(exc)) from None
        if self._backlog:
            frames, self._backlog = self._backlog + frames, []
        if self._error is not None:
            error, self._error = self._error, None
            self._backlog = frames
            raise error
        events: list[Frame] = []
        for index, frame in enumerate(frames):
            try:
                event = self._apply(frame)
            except ProtocolError as exc:
                # After a request's violation the rest goes on; after the session's, nothing does.
                self._backlog = frames[index + 1 :] if exc.request_id is not None else []
                if not events:
                    raise
                self._error = exc  # the events before it come first
                return events
            if event is not None:
                events.append(event)
        return events

    def _apply(self, frame: Frame) -> Frame | None:
        """One frame of this connection: a Batch sets the numbering; a new frame applies."""
        endpoint = self._endpoint
        if type(frame) is Batch:
            self._open_batch(frame)
            return None
        number = self._next
        if number is None:
            raise ProtocolError("a connection must open with a Batch frame")
        self._next = number + 1
        if number < endpoint._received:
            return None  # sent again after a lost connection: already delivered
        endpoint._received = number + 1
        return endpoint._receive(frame)

    def feed_each(
        self, data: bytes, on_event: Callable[[Frame], None], on_violation: Callable[[ProtocolError], None]
    ) -> None:
        """Feed ``data`` and hand on, in order, each event and each violation of one request;
        raises only what breaks the session as a whole."""
        while True:
            try:
                events = self.feed(data)
            except ProtocolError as exc:
                if exc.request_id is None:
                    raise
                on_violation(exc)
                events = []
            for event in events:
                on_event(event)
            if not self.backlogged:
                return
            data = b""

    def finish(self) -> None:
        """The connection ended: raise if its bytes were invalid. Ending inside a frame is
        no fault: that frame is sent again on the next connection."""
        try:
            self._decoder.feed(b"")
        except FrameError as exc:
            raise ProtocolError(str(exc)) from None

    def _open_batch(self, batch: Batch) -> None:
        endpoint = self._endpoint
        if batch.seq > endpoint._received:
            raise ProtocolError(f"frames {endpoint._received}..{batch.seq - 1} skipped")
        endpoint.acknowledge(batch.ack)
        self._next = batch.seq


def _check_slots(count: int, limits: Limits) -> None:
    if not 0 <= count <= limits.max_slots:
        raise ProtocolError(f"a slot count of {count} (0 to {limits.max_slots})")


# --- the broker's side ---------------------------------------------------------------


class ReplyState(Enum):
    AWAITING_HEAD = 1
    STREAMING = 2
    CANCELLED = 3  # Cancel sent: what still comes is dropped, until the End


class _Call:
    """A request as the broker tracks it."""

    __slots__ = ("body_done", "reply", "state", "upload")

    def __init__(self, more_body: bool) -> None:
        self.state = ReplyState.AWAITING_HEAD
        self.reply = _Window(INITIAL_CREDIT)
        self.upload = _Window(UPLOAD_CREDIT) if more_body else None
        self.body_done = not more_body


class BrokerConnection(_Endpoint):
    """The broker's side of one session: sends requests, receives their replies."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        super().__init__(limits)
        self._calls: dict[int, _Call] = {}
        self._last_id = 0
        self._ping_number = -1  # the number of the last Ping sent
        self.last_pong = 0.0  # the ``ping_sent`` of the connector's last Pong

    def _max_frame_size(self) -> int:
        return self.limits.max_reply_frame

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    @property
    def can_open(self) -> bool:
        return not (self.draining or self.peer_draining) and len(self._calls) < self.limits.max_streams

    def state(self, request_id: int) -> ReplyState | None:
        call = self._calls.get(request_id)
        return None if call is None else call.state

    # --- intents -----------------------------------------------------------

    def open(
        self,
        method: str,
        path: str,
        query: str,
        headers: Headers,
        body: bytes,
        llm_api_key: str | None = None,
        *,
        more_body: bool = False,
    ) -> int:
        """Send a request; its id. With ``more_body`` the body goes on in ``send_body``."""
        if not self.can_open:
            raise ProtocolError("this session takes no new request (draining or full)")
        self._last_id += 1
        request_id = self._last_id
        self._send(Request(request_id, method, path, query, headers, body, llm_api_key, more_body))
        self._calls[request_id] = _Call(more_body)
        return request_id

    def upload_room(self, request_id: int) -> int:
        """Bytes of request body the connector will take now."""
        call = self._calls.get(request_id)
        return 0 if call is None or call.upload is None or call.body_done else call.upload.room

    def send_body(self, request_id: int, data: bytes, *, more: bool) -> None:
        call = self._calls.get(request_id)
        if call is None or call.state is ReplyState.CANCELLED:
            return  # over already: the rest of the body has nowhere to go
        upload = call.upload
        if upload is None or call.body_done:
            raise ProtocolError("no body is being streamed", request_id)
        if len(data) > upload.room:
            raise ProtocolError(f"{len(data)} bytes of body exceed the {upload.room}-byte credit", request_id)
        upload.room -= len(data)
        call.body_done = not more
        self._send(Body(request_id, data, more))

    def consumed(self, request_id: int, size: int) -> None:
        """The user took ``size`` bytes of the reply: the connector may send as many more."""
        call = self._calls.get(request_id)
        if call is not None and call.state is ReplyState.STREAMING:
            grant = call.reply.consumed(size)
            if grant:
                self._send(Credit(request_id, grant))

    def cancel(self, request_id: int) -> None:
        """Abort the request at the LLM; its End is still awaited (and its frames dropped)."""
        call = self._calls.get(request_id)
        if call is not None and call.state is not ReplyState.CANCELLED:
            call.state = ReplyState.CANCELLED
            self._send(Cancel(request_id))

    def ping(self, now: float) -> bool:
        """Queue a Ping stamped ``now``; False while the last one is unacknowledged, so a
        flood of Pongs (each asks for an echo) cannot queue Pings without bound."""
        if self._ping_number >= self._first_unacked:
            return False
        self._ping_number = self._first_unacked + len(self._unacked)
        self._send(Ping(now, self.last_pong))
        return True

    def models(self, models: list[str]) -> None:
        """Tell the connector which models the broker now routes to it."""
        self._send(Models(models))

    def brokers(self, brokers: list[tuple[str, str]]) -> None:
        """Tell the connector which brokers are live (it holds a session to each)."""
        self._send(Brokers(brokers))

    def capacity(self, max_concurrent: int | None) -> None:
        """Tell the connector its max_concurrent here (None: no cap)."""
        self._send(Capacity(max_concurrent or 0))

    # --- frames of the connector ----------------------------------------------

    def _receive(self, frame: Frame) -> Frame | None:
        kind = type(frame)
        if kind is Chunk or kind is Head or kind is End or kind is Credit:
            return self._reply(frame)  # type: ignore[arg-type]
        if kind is Pong:
            self.last_pong = frame.ping_sent  # type: ignore[union-attr]
            return frame
        if kind is Drain:
            self.peer_draining = True
            return frame
        if kind is Slots:
            _check_slots(frame.free, self.limits)  # type: ignore[union-attr]
            return frame
        raise ProtocolError(f"a {kind.__name__} frame may not travel connector → broker")

    def _reply(self, frame: Chunk | Head | End | Credit) -> Frame | None:
        request_id = frame.id
        call = self._calls.get(request_id)
        if call is None:
            raise ProtocolError(f"{type(frame).__name__} for a request not in flight", request_id)
        if type(frame) is End:
            del self._calls[request_id]
            return frame
        if type(frame) is Credit:
            if call.upload is None:
                raise ProtocolError("credit for a body not streamed", request_id)
            call.upload.grant(frame.bytes, request_id)
            return None if call.state is ReplyState.CANCELLED else frame
        if call.state is ReplyState.CANCELLED:
            return None  # sent before the Cancel arrived: nobody wants it
        if type(frame) is Head:
            if call.state is not ReplyState.AWAITING_HEAD:
                raise ProtocolError("a second Head", request_id)
            call.state = ReplyState.STREAMING
            return frame
        if call.state is not ReplyState.STREAMING:
            raise ProtocolError("a Chunk before the Head", request_id)
        call.reply.take(len(frame.data), request_id)  # type: ignore[union-attr]
        return frame


# --- the connector's side -------------------------------------------------------------


class _Job:
    """A request as the connector runs it."""

    __slots__ = ("head_sent", "reply", "upload", "upload_done")

    def __init__(self, more_body: bool) -> None:
        self.head_sent = False
        self.reply = _Window(INITIAL_CREDIT)
        self.upload = _Window(UPLOAD_CREDIT) if more_body else None
        self.upload_done = not more_body


class ConnectorConnection(_Endpoint):
    """The connector's side of one session: receives requests, sends their replies."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        super().__init__(limits)
        self._jobs: dict[int, _Job] = {}
        self._last_id = 0  # request ids only increase: an old one is never run again
        self.last_ping: Ping | None = None
        self.refused = 0  # requests refused (reused ids, too many at once, while draining)

    def _max_frame_size(self) -> int:
        return MAX_FRAME_SIZE

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    # --- intents -------------------------------------------------------------

    def send_head(self, request_id: int, status: int, headers: Headers, llm_ms: float = 0.0) -> None:
        job = self._job(request_id)
        if job.head_sent:
            raise ProtocolError("a second Head", request_id)
        job.head_sent = True
        self._send(Head(request_id, status, headers, llm_ms))

    def reply_room(self, request_id: int) -> int:
        """Bytes of reply body the broker will take now (0: wait for its Credit)."""
        job = self._jobs.get(request_id)
        return 0 if job is None else job.reply.room

    def send_chunk(self, request_id: int, data: bytes) -> None:
        job = self._job(request_id)
        if not job.head_sent:
            raise ProtocolError("a Chunk before the Head", request_id)
        if len(data) > job.reply.room:
            raise ProtocolError(f"{len(data)} bytes exceed the {job.reply.room}-byte credit", request_id)
        job.reply.room -= len(data)
        self._send(Chunk(request_id, data))

    def end(
        self, request_id: int, error: ErrorKind | None = None, detail: str = "", *,
        tokens: tuple[int, int] = (0, 0), usage: UsageSource = "unknown",
    ) -> None:  # fmt: skip
        """The reply is over (whole, or failed with ``error``), with the tokens it used (prompt, completion)."""
        if self._jobs.pop(request_id, None) is None:
            raise ProtocolError("ended twice", request_id)
        self._send(End(request_id, error, detail, tokens[0], tokens[1], usage))

    def consumed(self, request_id: int, size: int) -> None:
        """The LLM took ``size`` bytes of the request body: the broker may send as many more."""
        job = self._jobs.get(request_id)
        if job is not None and job.upload is not None:
            grant = job.upload.consumed(size)
            if grant:
                self._send(Credit(request_id, grant))

    def pong(self) -> None:
        """A heartbeat, echoing the last Ping (the broker's sign that uploads arrive)."""
        self._send(Pong(self.last_ping.sent if self.last_ping else 0.0))

    def slots(self, free: int) -> None:
        """Tell the broker how many more requests this connector takes now, all brokers together."""
        self._send(Slots(free))

    def _job(self, request_id: int) -> _Job:
        job = self._jobs.get(request_id)
        if job is None:
            raise ProtocolError("not in flight", request_id)
        return job

    # --- frames of the broker -------------------------------------------------

    def _receive(self, frame: Frame) -> Frame | None:
        kind = type(frame)
        if kind is Request:
            return self._request(frame)  # type: ignore[arg-type]
        if kind is Body or kind is Cancel or kind is Credit:
            return self._for_job(frame)  # type: ignore[arg-type]
        if kind is Ping:
            self.last_ping = frame  # type: ignore[assignment]
            return frame
        if kind is Models:
            why = check_models(frame.models, self.limits)  # type: ignore[union-attr]
            if why is not None:
                raise ProtocolError(f"Models: {why}")
            return frame
        if kind is Drain:
            self.peer_draining = True
            return frame
        if kind is Brokers:
            why = check_brokers(frame.brokers)  # type: ignore[union-attr]
            if why is not None:
                raise ProtocolError(f"Brokers: {why}")
            return frame
        if kind is Capacity:
            _check_slots(frame.max_concurrent, self.limits)  # type: ignore[union-attr]
            return frame
        raise ProtocolError(f"a {kind.__name__} frame may not travel broker → connector")

    def _request(self, request: Request) -> Request | None:
        why = None
        if request.id <= self._last_id:
            why = "a request id used before"
        elif len(self._jobs) >= self.limits.max_streams:
            why = f"{len(self._jobs)} requests in flight already"
        elif self.draining or self.peer_draining:
            why = "the session is draining"
        if why is not None:
            self.refused += 1
            self._send(End(request.id, "refused", why))
            return None
        self._last_id = request.id
        self._jobs[request.id] = _Job(request.more_body)
        return request

    def _for_job(self, frame: Body | Cancel | Credit) -> Frame | None:
        job = self._jobs.get(frame.id)
        if job is None:
            if frame.id <= self._last_id:
                return None  # crossed the End of a request that is over
            raise ProtocolError(f"{type(frame).__name__} for a request never sent", frame.id)
        if type(frame) is Cancel:
            return frame
        if type(frame) is Credit:
            job.reply.grant(frame.bytes, frame.id)
            return frame
        if job.upload is None or job.upload_done:
            raise ProtocolError("Body after the request's body ended", frame.id)
        job.upload.take(len(frame.data), frame.id)  # type: ignore[union-attr]
        job.upload_done = not frame.more  # type: ignore[union-attr]
        return frame
