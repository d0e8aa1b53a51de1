"""wire.protocol under random interleavings of frames, lost connections, resumes and late
duplicates: no frame is lost, none is delivered twice, and every request ends."""

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from wire import (
    Body,
    BrokerConnection,
    Cancel,
    Chunk,
    ConnectorConnection,
    Credit,
    End,
    Frame,
    Head,
    Inbound,
    Request,
)


class _Link:
    """One direction of the tunnel: the connection now carrying it and those it replaced."""

    def __init__(self, reader: Inbound) -> None:
        self.reader = reader
        self.in_transit = b""  # written, not yet read
        self.written = b""  # all this connection carried, for replaying it late
        self.old: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.in_transit += data
        self.written += data

    def read(self, size: int) -> list[Frame]:
        data, self.in_transit = self.in_transit[:size], self.in_transit[size:]
        return self.reader.feed(data)

    def replace(self, reader: Inbound) -> None:
        self.old.append(self.written)
        self.reader, self.in_transit, self.written = reader, b"", b""


class Tunnel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.broker = BrokerConnection()
        self.connector = ConnectorConnection()
        self.poll = _Link(self.connector.inbound())
        self.uplink = _Link(self.broker.inbound())
        self.opened: list[int] = []
        self.cancelled: set[int] = set()
        self.body_sent: dict[int, bytes] = {}  # request body, as the broker sent it
        self.body_got: dict[int, bytes] = {}  # as the connector received it
        self.body_whole: set[int] = set()  # the connector has the last piece
        self.reply_sent: dict[int, bytes] = {}  # reply body, as the connector sent it
        self.reply_got: dict[int, bytes] = {}  # as the broker received it
        self.unconsumed: dict[int, int] = {}  # reply bytes the "user" has not read yet
        self.running: dict[int, Request] = {}  # at the connector, not ended
        self.headed: set[int] = set()
        self.received_requests: list[int] = []
        self.ended: list[int] = []  # End events at the broker

    # --- the broker's side ---------------------------------------------------------

    @precondition(lambda self: self.broker.can_open and len(self.opened) < 40)
    @rule(more_body=st.booleans(), body=st.binary(max_size=8))
    def open_request(self, more_body: bool, body: bytes) -> None:
        request_id = self.broker.open("POST", "/v1/x", "", [], body, more_body=more_body)
        self.opened.append(request_id)
        self.body_sent[request_id] = body

    @rule(data=st.data())
    def send_body(self, data: st.DataObject) -> None:
        streaming = [r for r in self.opened if self.broker.upload_room(r) > 0]
        if streaming:
            request_id = data.draw(st.sampled_from(streaming))
            room = self.broker.upload_room(request_id)
            piece = data.draw(st.binary(max_size=min(room, 300)))
            self.broker.send_body(request_id, piece, more=data.draw(st.booleans()))
            if request_id not in self.cancelled:
                self.body_sent[request_id] += piece

    @rule(data=st.data())
    def user_reads(self, data: st.DataObject) -> None:
        unread = [r for r, n in self.unconsumed.items() if n]
        if unread:
            request_id = data.draw(st.sampled_from(unread))
            size = data.draw(st.integers(1, self.unconsumed[request_id]))
            self.unconsumed[request_id] -= size
            self.broker.consumed(request_id, size)

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        live = [r for r in self.opened if self.broker.state(r) is not None]
        if live:
            request_id = data.draw(st.sampled_from(live))
            self.broker.cancel(request_id)
            self.cancelled.add(request_id)

    @rule(now=st.floats(0, 1e6))
    def ping(self, now: float) -> None:
        self.broker.ping(now)

    @rule()
    def broker_writes(self) -> None:
        self.poll.write(self.broker.data_to_send())

    # --- the connector's side -------------------------------------------------------

    @rule(data=st.data())
    def llm_answers(self, data: st.DataObject) -> None:
        if not self.running:
            return
        request_id = data.draw(st.sampled_from(sorted(self.running)))
        action = data.draw(st.sampled_from(["head", "chunk", "end", "fail", "take_body"]))
        if action == "head" and request_id not in self.headed:
            self.connector.send_head(request_id, 200, [])
            self.headed.add(request_id)
        elif action == "chunk" and request_id in self.headed:
            room = self.connector.reply_room(request_id)
            piece = data.draw(st.binary(min_size=1, max_size=400))[:room]
            if piece:
                self.connector.send_chunk(request_id, piece)
                self.reply_sent.setdefault(request_id, b"")
                self.reply_sent[request_id] += piece
        elif action in ("end", "fail"):
            self._end(request_id, None if action == "end" else "llm_failed")
        elif action == "take_body":
            self.connector.consumed(request_id, len(self.body_got.get(request_id, b"")))

    @rule()
    def heartbeat(self) -> None:
        self.connector.pong()

    @rule()
    def connector_writes(self) -> None:
        self.uplink.write(self.connector.data_to_send())

    # --- the network ----------------------------------------------------------------

    @rule(size=st.integers(0, 2000))
    def poll_delivers(self, size: int) -> None:
        for event in self.poll.read(size):
            self._at_connector(event)

    @rule(size=st.integers(0, 2000))
    def uplink_delivers(self, size: int) -> None:
        for event in self.uplink.read(size):
            self._at_broker(event)

    @rule()
    def poll_lost(self) -> None:
        """The poll dies; the connector polls again, saying what it has received."""
        self.poll.replace(self.connector.inbound())
        self.broker.acknowledge(self.connector.received)
        self.broker.rewind()

    @rule()
    def uplink_lost(self) -> None:
        self.uplink.replace(self.broker.inbound())
        self.connector.rewind()

    @precondition(lambda self: self.poll.old)
    @rule(data=st.data())
    def old_poll_arrives_late(self, data: st.DataObject) -> None:
        """A proxy that held an old poll's response lets it through after all."""
        old = data.draw(st.sampled_from(self.poll.old))
        for event in self.connector.inbound().feed(old):
            self._at_connector(event)

    @precondition(lambda self: self.uplink.old)
    @rule(data=st.data())
    def old_uplink_arrives_late(self, data: st.DataObject) -> None:
        old = data.draw(st.sampled_from(self.uplink.old))
        for event in self.broker.inbound().feed(old):
            self._at_broker(event)

    # --- what each side sees ----------------------------------------------------------

    def _at_connector(self, event: Frame) -> None:
        if isinstance(event, Request):
            assert event.id not in self.received_requests, "a request delivered twice"
            self.received_requests.append(event.id)
            self.running[event.id] = event
            self.body_got[event.id] = event.body
            if not event.more_body:
                self.body_whole.add(event.id)
        elif isinstance(event, Body):
            self.body_got[event.id] += event.data
            if not event.more:
                self.body_whole.add(event.id)
        elif isinstance(event, Cancel) and event.id in self.running:
            self._end(event.id, "cancelled")

    def _at_broker(self, event: Frame) -> None:
        if isinstance(event, Head):
            self.reply_got.setdefault(event.id, b"")
            self.unconsumed[event.id] = 0
        elif isinstance(event, Chunk):
            self.reply_got[event.id] += event.data
            self.unconsumed[event.id] += len(event.data)
        elif isinstance(event, End):
            assert event.id not in self.ended, "a request ended twice"
            self.ended.append(event.id)
            self.unconsumed.pop(event.id, None)
        else:
            assert not isinstance(event, Credit) or event.id not in self.ended

    def _end(self, request_id: int, error: str | None) -> None:
        self.connector.end(request_id, error)  # type: ignore[arg-type]
        del self.running[request_id]

    @invariant()
    def delivered_in_order_without_duplicates(self) -> None:
        assert self.received_requests == sorted(set(self.received_requests))
        assert set(self.received_requests) <= set(self.opened)
        for request_id, got in self.body_got.items():
            assert self.body_sent[request_id].startswith(got)
        for request_id, got in self.reply_got.items():
            if request_id not in self.cancelled:
                assert self.reply_sent.get(request_id, b"").startswith(got)

    def teardown(self) -> None:
        """The network heals: everything gets through, every request ends, nothing twice."""
        self.poll_lost()
        self.uplink_lost()
        for round in range(4):
            if round:  # (a request ended before its body arrived would lose the rest: legal)
                for request_id in sorted(self.running):
                    self._end(request_id, "cancelled")
            self.broker_writes()
            self.poll_delivers(10**9)
            self.connector_writes()
            self.uplink_delivers(10**9)
        assert sorted(self.received_requests) == self.opened, "a request was lost"
        assert sorted(self.ended) == self.opened, "a request did not end"
        assert self.broker.in_flight == 0 and self.connector.in_flight == 0
        assert self.broker.unacked == 0 and self.connector.unacked == 0
        for request_id in self.opened:
            if request_id not in self.cancelled:
                assert self.reply_got.get(request_id, b"") == self.reply_sent.get(request_id, b"")
        for request_id in self.body_whole - self.cancelled:
            assert self.body_got[request_id] == self.body_sent[request_id]


Tunnel.TestCase.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_tunnel_protocol = Tunnel.TestCase
