"""wire.protocol: every transition of both sides, legal and illegal, fed bytes in-process."""

import pytest

from wire import (
    DEFAULT_LIMITS,
    INITIAL_CREDIT,
    UPLOAD_CREDIT,
    Batch,
    Body,
    BrokerConnection,
    Cancel,
    Capacity,
    Chunk,
    ConnectorConnection,
    Credit,
    Drain,
    End,
    Frame,
    Head,
    Hello,
    Limits,
    Models,
    Ping,
    Pong,
    ProtocolError,
    ReplyState,
    Request,
    Slots,
    decode_all,
    encode_many,
)


class Pair:
    """A broker and a connector joined by one poll and one uplink, all in memory."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.broker = BrokerConnection(limits)
        self.connector = ConnectorConnection(limits)
        self.poll = self.connector.inbound()  # what the connector reads
        self.uplink = self.broker.inbound()  # what the broker reads

    def to_connector(self) -> list[Frame]:
        return self.poll.feed(self.broker.data_to_send())

    def to_broker(self) -> list[Frame]:
        return self.uplink.feed(self.connector.data_to_send())

    def request(self, body: bytes = b"{}", *, more_body: bool = False) -> int:
        request_id = self.broker.open("POST", "/v1/chat/completions", "", [], body, "sk-llm", more_body=more_body)
        [event] = self.to_connector()
        assert isinstance(event, Request) and event.id == request_id
        return request_id

    def streaming(self) -> int:
        request_id = self.request()
        self.connector.send_head(request_id, 200, [("content-type", "text/event-stream")])
        [head] = self.to_broker()
        assert isinstance(head, Head)
        return request_id


def frames_of(data: bytes) -> list[Frame]:
    return decode_all(data)


def written(endpoint: BrokerConnection | ConnectorConnection) -> list[Frame]:
    """The frames of the endpoint's next write, without its Batch (for forged exchanges)."""
    return [frame for frame in frames_of(endpoint.data_to_send()) if not isinstance(frame, Batch)]


def raw(*frames: Frame) -> bytes:
    return encode_many(frames)


# --- a request's life ---------------------------------------------------------------


def test_request_head_chunks_end() -> None:
    pair = Pair()
    request_id = pair.request()
    assert pair.broker.state(request_id) is ReplyState.AWAITING_HEAD
    pair.connector.send_head(request_id, 200, [("content-type", "application/json")], 1.5)
    pair.connector.send_chunk(request_id, b"hello ")
    pair.connector.send_chunk(request_id, b"world")
    pair.connector.end(request_id)
    events = pair.to_broker()
    assert events == [
        Head(request_id, 200, [("content-type", "application/json")], 1.5),
        Chunk(request_id, b"hello "),
        Chunk(request_id, b"world"),
        End(request_id),
    ]
    assert pair.broker.in_flight == 0 and pair.connector.in_flight == 0
    assert pair.broker.state(request_id) is None


def test_frames_ready_together_leave_in_one_write_behind_one_batch() -> None:
    pair = Pair()
    request_id = pair.streaming()
    for _ in range(5):
        pair.connector.send_chunk(request_id, b"x")
    frames = frames_of(pair.connector.data_to_send())
    assert isinstance(frames[0], Batch) and [type(f) for f in frames[1:]] == [Chunk] * 5
    assert pair.connector.data_to_send() == b""  # nothing new, nothing owed


def test_request_ids_increase() -> None:
    pair = Pair()
    assert [pair.request(), pair.request(), pair.request()] == [1, 2, 3]


def test_end_with_an_error_before_the_head() -> None:
    pair = Pair()
    request_id = pair.request()
    pair.connector.end(request_id, "llm_unreachable", "ConnectError")
    assert pair.to_broker() == [End(request_id, "llm_unreachable", "ConnectError")]
    assert pair.broker.in_flight == 0


def test_chunk_before_head_is_refused_locally_and_from_the_peer() -> None:
    pair = Pair()
    request_id = pair.request()
    with pytest.raises(ProtocolError, match="before the Head") as caught:
        pair.connector.send_chunk(request_id, b"x")
    assert caught.value.request_id == request_id
    forged = raw(Batch(0, 1), Chunk(request_id, b"x"))
    with pytest.raises(ProtocolError, match="before the Head") as caught:
        pair.uplink.feed(forged)
    assert caught.value.request_id == request_id


def test_a_second_head_is_a_violation() -> None:
    pair = Pair()
    request_id = pair.streaming()
    with pytest.raises(ProtocolError, match="second Head"):
        pair.connector.send_head(request_id, 200, [])
    with pytest.raises(ProtocolError, match="second Head") as caught:
        pair.uplink.feed(raw(Batch(1, 1), Head(request_id, 200, [])))
    assert caught.value.request_id == request_id


def test_reply_for_a_request_never_sent_names_it() -> None:
    pair = Pair()
    with pytest.raises(ProtocolError, match="not in flight") as caught:
        pair.uplink.feed(raw(Batch(0, 0), Head(99, 200, [])))
    assert caught.value.request_id == 99


def test_frames_after_end_are_a_violation() -> None:
    pair = Pair()
    request_id = pair.streaming()
    pair.connector.end(request_id)
    pair.to_broker()
    with pytest.raises(ProtocolError, match="not in flight"):
        pair.uplink.feed(raw(Batch(2, 1), Chunk(request_id, b"late")))
    with pytest.raises(ProtocolError, match="ended twice"):
        pair.connector.end(request_id)


def test_the_frames_after_a_request_level_violation_are_still_delivered() -> None:
    pair = Pair()
    good = pair.streaming()
    with pytest.raises(ProtocolError):
        pair.uplink.feed(raw(Batch(1, 1), Head(99, 200, []), Chunk(good, b"kept")))
    assert pair.uplink.feed(b"") == [Chunk(good, b"kept")]


def test_the_frames_before_a_violation_come_first_then_the_error_then_the_rest() -> None:
    pair = Pair()
    good = pair.streaming()
    assert pair.uplink.feed(raw(Batch(1, 1), Chunk(good, b"before"), Head(99, 200, []), Chunk(good, b"after"))) == [
        Chunk(good, b"before")
    ]
    assert pair.uplink.backlogged
    with pytest.raises(ProtocolError) as caught:
        pair.uplink.feed(b"")
    assert caught.value.request_id == 99
    assert pair.uplink.feed(b"") == [Chunk(good, b"after")]
    assert not pair.uplink.backlogged


def test_the_frames_before_a_session_violation_come_first_then_nothing_more() -> None:
    pair = Pair()
    good = pair.streaming()
    bad = raw(Batch(1, 1), Chunk(good, b"before"), Ping(1.0), Chunk(good, b"after"))
    assert pair.uplink.feed(bad) == [Chunk(good, b"before")]
    with pytest.raises(ProtocolError, match="may not travel") as caught:
        pair.uplink.feed(b"")
    assert caught.value.request_id is None
    assert not pair.uplink.backlogged


@pytest.mark.parametrize(
    "frame",
    [
        Request(1, "GET", "/", "", [], b""), Cancel(1), Ping(1.0), Models([]), Body(1, b""), Hello("c", "1", []),
        Capacity(4),
    ],
)  # fmt: skip
def test_broker_refuses_frames_that_travel_the_other_way(frame: Frame) -> None:
    pair = Pair()
    pair.request()
    with pytest.raises(ProtocolError, match="may not travel connector → broker") as caught:
        pair.uplink.feed(raw(Batch(0, 1), frame))
    assert caught.value.request_id is None


@pytest.mark.parametrize("frame", [Head(1, 200, []), Chunk(1, b""), End(1), Pong(1.0), Hello("c", "1", []), Slots(1)])
def test_connector_refuses_frames_that_travel_the_other_way(frame: Frame) -> None:
    pair = Pair()
    with pytest.raises(ProtocolError, match="may not travel broker → connector"):
        pair.poll.feed(raw(Batch(0, 0), frame))


def test_the_cap_and_the_free_slots_cross_each_their_way() -> None:
    pair = Pair()
    pair.broker.capacity(4)
    pair.broker.capacity(None)
    assert pair.to_connector() == [Capacity(4), Capacity(0)]
    pair.connector.slots(3)
    assert pair.to_broker() == [Slots(3)]


@pytest.mark.parametrize("count", [-1, DEFAULT_LIMITS.max_slots + 1])
def test_slot_counts_out_of_bounds_break_the_session(count: int) -> None:
    pair = Pair()
    with pytest.raises(ProtocolError, match="slot count") as caught:
        pair.uplink.feed(raw(Batch(0, 0), Slots(count)))
    assert caught.value.request_id is None
    with pytest.raises(ProtocolError, match="slot count"):
        pair.poll.feed(raw(Batch(0, 0), Capacity(count)))


def test_a_connection_must_open_with_a_batch() -> None:
    pair = Pair()
    with pytest.raises(ProtocolError, match="open with a Batch"):
        pair.uplink.feed(raw(Pong(0.0)))


def test_garbage_is_a_protocol_error() -> None:
    pair = Pair()
    with pytest.raises(ProtocolError, match="undecodable"):
        pair.uplink.feed(b"\x00\x00\x00\x02\xff\xff")


def test_reply_frames_over_the_limit_are_refused_before_buffering() -> None:
    pair = Pair(Limits(max_reply_frame=1024))
    with pytest.raises(ProtocolError, match="exceeds the 1024-byte limit"):
        pair.uplink.feed((10**6).to_bytes(4, "big"))


def test_a_connection_cut_inside_a_frame_loses_nothing() -> None:
    pair = Pair()
    request_id = pair.broker.open("GET", "/v1/models", "", [], b"")
    data = pair.broker.data_to_send()
    assert pair.poll.feed(data[:-3]) == []
    pair.poll.finish()  # no fault: the frame comes again
    pair.poll = pair.connector.inbound()
    pair.broker.rewind()
    assert [e.id for e in pair.to_connector()] == [request_id]  # type: ignore[attr-defined]


def test_garbage_at_the_end_of_a_connection_is_reported_when_it_ends() -> None:
    pair = Pair()
    assert pair.uplink.feed(raw(Batch(0, 0), Pong(1.0)) + b"\xff\xff\xff\xff") == [Pong(1.0)]
    with pytest.raises(ProtocolError, match="exceeds"):
        pair.uplink.finish()


# --- credit ---------------------------------------------------------------------------


def test_reply_credit_is_exhausted_then_granted_in_half_window_steps() -> None:
    pair = Pair()
    request_id = pair.streaming()
    assert pair.connector.reply_room(request_id) == INITIAL_CREDIT
    pair.connector.send_chunk(request_id, b"x" * INITIAL_CREDIT)
    assert pair.connector.reply_room(request_id) == 0
    with pytest.raises(ProtocolError, match="exceed the 0-byte credit"):
        pair.connector.send_chunk(request_id, b"y")
    pair.to_broker()
    pair.broker.consumed(request_id, INITIAL_CREDIT // 2 - 1)
    assert pair.to_connector() == []  # under a step: no Credit yet
    pair.broker.consumed(request_id, 1)
    assert pair.to_connector() == [Credit(request_id, INITIAL_CREDIT // 2)]
    assert pair.connector.reply_room(request_id) == INITIAL_CREDIT // 2


def test_credit_overrun_by_a_hostile_connector_is_a_violation_of_that_request() -> None:
    pair = Pair()
    request_id = pair.streaming()
    overrun = raw(Batch(1, 1), Chunk(request_id, b"x" * INITIAL_CREDIT), Chunk(request_id, b"y"))
    assert len(pair.uplink.feed(overrun)) == 1
    with pytest.raises(ProtocolError, match="beyond its credit") as caught:
        pair.uplink.feed(b"")
    assert caught.value.request_id == request_id


def test_credit_beyond_the_window_is_a_violation() -> None:
    pair = Pair()
    request_id = pair.streaming()
    with pytest.raises(ProtocolError, match="beyond the window") as caught:
        pair.poll.feed(raw(Batch(1, 1), Credit(request_id, 1)))
    assert caught.value.request_id == request_id
    with pytest.raises(ProtocolError, match="beyond the window"):
        pair.poll.feed(raw(Credit(request_id, -5)))


def test_credit_for_a_request_over_is_dropped_by_the_connector() -> None:
    pair = Pair()
    request_id = pair.streaming()
    pair.connector.end(request_id)
    pair.broker.consumed(request_id, INITIAL_CREDIT)  # crossed the End: the broker knows nothing yet
    assert pair.poll.feed(raw(Batch(1, 1), Credit(request_id, 10))) == []


def test_credit_for_a_request_never_sent_is_a_violation() -> None:
    pair = Pair()
    with pytest.raises(ProtocolError, match="never sent") as caught:
        pair.poll.feed(raw(Batch(0, 0), Credit(7, 10)))
    assert caught.value.request_id == 7


# --- streamed request bodies ----------------------------------------------------------


def test_streamed_body_flows_within_upload_credit_both_ways() -> None:
    pair = Pair()
    request_id = pair.request(b"part1", more_body=True)
    assert pair.broker.upload_room(request_id) == UPLOAD_CREDIT
    pair.broker.send_body(request_id, b"x" * UPLOAD_CREDIT, more=True)
    assert pair.broker.upload_room(request_id) == 0
    with pytest.raises(ProtocolError, match="exceed the 0-byte credit"):
        pair.broker.send_body(request_id, b"y", more=False)
    [body] = pair.to_connector()
    assert body == Body(request_id, b"x" * UPLOAD_CREDIT, True)
    pair.connector.consumed(request_id, UPLOAD_CREDIT)
    assert pair.to_broker() == [Credit(request_id, UPLOAD_CREDIT)]
    assert pair.broker.upload_room(request_id) == UPLOAD_CREDIT
    pair.broker.send_body(request_id, b"last", more=False)
    assert pair.to_connector() == [Body(request_id, b"last", False)]
    assert pair.broker.upload_room(request_id) == 0
    with pytest.raises(ProtocolError, match="no body is being streamed"):
        pair.broker.send_body(request_id, b"more", more=False)


def test_body_after_its_end_or_without_more_body_is_a_violation() -> None:
    pair = Pair()
    plain = pair.request()
    with pytest.raises(ProtocolError, match="after the request's body ended") as caught:
        pair.poll.feed(raw(Batch(1, 0), Body(plain, b"x")))
    assert caught.value.request_id == plain


def test_body_overrun_by_a_hostile_broker_is_a_violation() -> None:
    pair = Pair()
    request_id = pair.request(more_body=True)
    with pytest.raises(ProtocolError, match="beyond its credit"):
        pair.poll.feed(raw(Batch(1, 0), Body(request_id, b"x" * (UPLOAD_CREDIT + 1))))


def test_body_for_a_request_that_ended_is_dropped() -> None:
    pair = Pair()
    request_id = pair.request(more_body=True)
    pair.connector.end(request_id, "llm_failed")  # the LLM gave up before the body ended
    pair.broker.send_body(request_id, b"rest", more=False)
    assert pair.to_connector() == []
    assert pair.to_broker() == [End(request_id, "llm_failed")]
    pair.broker.send_body(request_id, b"after", more=False)  # over: dropped quietly
    assert written(pair.broker) == []


def test_upload_credit_for_a_request_without_a_streamed_body_is_a_violation() -> None:
    pair = Pair()
    request_id = pair.request()
    with pytest.raises(ProtocolError, match="credit for a body not streamed"):
        pair.uplink.feed(raw(Batch(0, 1), Credit(request_id, 10)))


# --- cancel in each state -------------------------------------------------------------


def test_cancel_before_the_request_left() -> None:
    pair = Pair()
    request_id = pair.broker.open("GET", "/v1/models", "", [], b"")
    pair.broker.cancel(request_id)
    events = pair.to_connector()
    assert events == [Request(request_id, "GET", "/v1/models", "", [], b""), Cancel(request_id)]
    pair.connector.end(request_id, "cancelled")
    assert pair.to_broker() == [End(request_id, "cancelled")]
    assert pair.broker.in_flight == 0


def test_cancel_while_awaiting_the_head_drops_what_crosses_it() -> None:
    pair = Pair()
    request_id = pair.request()
    pair.broker.cancel(request_id)
    assert pair.broker.state(request_id) is ReplyState.CANCELLED
    pair.connector.send_head(request_id, 200, [])  # crossed the Cancel
    pair.connector.send_chunk(request_id, b"x")
    assert pair.to_broker() == []
    assert pair.to_connector() == [Cancel(request_id)]
    pair.connector.end(request_id, "cancelled")
    assert pair.to_broker() == [End(request_id, "cancelled")]


def test_cancel_while_streaming() -> None:
    pair = Pair()
    request_id = pair.streaming()
    pair.broker.cancel(request_id)
    pair.broker.cancel(request_id)  # twice: one Cancel
    assert pair.to_connector() == [Cancel(request_id)]
    pair.broker.consumed(request_id, INITIAL_CREDIT)  # no credit for a cancelled reply
    assert pair.broker.data_to_send() == b""
    pair.connector.end(request_id, "cancelled")
    assert pair.to_broker() == [End(request_id, "cancelled")]


def test_cancel_crossing_the_end() -> None:
    pair = Pair()
    request_id = pair.streaming()
    pair.connector.end(request_id)
    pair.broker.cancel(request_id)
    assert pair.to_connector() == []  # the connector drops a Cancel for a request over
    assert pair.to_broker() == [End(request_id)]
    assert pair.broker.in_flight == 0


def test_cancel_after_the_end_sends_nothing() -> None:
    pair = Pair()
    request_id = pair.streaming()
    pair.connector.end(request_id)
    pair.to_broker()
    pair.broker.cancel(request_id)
    assert written(pair.broker) == []


def test_cancel_for_a_request_never_sent_is_a_violation() -> None:
    pair = Pair()
    with pytest.raises(ProtocolError, match="never sent"):
        pair.poll.feed(raw(Batch(0, 0), Cancel(3)))


# --- ping, pong, drain, models ----------------------------------------------------------


def test_ping_pong_echo() -> None:
    pair = Pair()
    assert pair.broker.ping(100.0)
    assert pair.to_connector() == [Ping(100.0, 0.0)]
    pair.connector.pong()
    assert pair.to_broker() == [Pong(100.0)]
    assert pair.broker.last_pong == 100.0
    assert pair.broker.ping(101.0)
    assert pair.to_connector() == [Ping(101.0, 100.0)]


def test_a_pong_flood_queues_one_ping_at_a_time() -> None:
    pair = Pair()
    pair.broker.ping(1.0)
    pair.to_connector()
    flood = raw(*([Batch(0, 0)] + [Pong(1.0)] * 10_000))  # acknowledges nothing
    assert len(pair.uplink.feed(flood)) == 10_000
    assert pair.broker.ping(2.0) is False
    assert pair.broker.unacked == 1
    pair.uplink.feed(raw(Batch(10_000, 1)))  # the Ping arrived
    assert pair.broker.ping(3.0) is True


def test_a_peer_that_never_acknowledges_is_a_violation() -> None:
    pair = Pair(Limits(max_unacked=3))
    for _ in range(3):
        pair.broker.models([])
    with pytest.raises(ProtocolError, match="not acknowledged 3 frames"):
        pair.broker.models([])


def test_models() -> None:
    pair = Pair()
    pair.broker.models(["llama3:8b", "org/Model-7B"])
    assert pair.to_connector() == [Models(["llama3:8b", "org/Model-7B"])]


@pytest.mark.parametrize("models", [["bad name"], ["x" * 257], [""], ["a"] * 1025, ["é"]])
def test_bad_model_lists_are_a_violation(models: list[str]) -> None:
    pair = Pair()
    with pytest.raises(ProtocolError, match="Models"):
        pair.poll.feed(raw(Batch(0, 0), Models(models)))


def test_connector_drain_stops_new_requests_at_the_broker() -> None:
    pair = Pair()
    request_id = pair.request()
    pair.connector.drain("bye")
    pair.connector.drain("bye")  # once
    assert pair.to_broker() == [Drain("bye")]
    assert pair.broker.peer_draining and not pair.broker.can_open
    with pytest.raises(ProtocolError, match="no new request"):
        pair.broker.open("GET", "/", "", [], b"")
    pair.connector.end(request_id)  # what is in flight still ends
    assert pair.to_broker() == [End(request_id)]


def test_broker_drain_makes_the_connector_refuse_new_requests() -> None:
    pair = Pair()
    pair.broker.drain("restart")
    assert pair.to_connector() == [Drain("restart")]
    assert pair.connector.peer_draining
    assert pair.poll.feed(raw(Batch(1, 0), Request(1, "GET", "/", "", [], b""))) == []
    assert written(pair.connector) == [End(1, "refused", "the session is draining")]


# --- bounds against a hostile peer -----------------------------------------------------


def test_connector_refuses_a_reused_request_id_and_keeps_the_session() -> None:
    pair = Pair()
    request_id = pair.request()
    assert pair.poll.feed(raw(Batch(1, 0), Request(request_id, "POST", "/", "", [], b""))) == []
    assert written(pair.connector) == [End(request_id, "refused", "a request id used before")]
    assert pair.connector.refused == 1
    assert pair.poll.feed(raw(Request(request_id + 1, "POST", "/", "", [], b""))) != []


def test_connector_refuses_requests_beyond_its_stream_limit() -> None:
    pair = Pair(Limits(max_streams=2))
    events = pair.poll.feed(raw(Batch(0, 0), *(Request(i, "GET", "/", "", [], b"") for i in (1, 2, 3))))
    assert [e.id for e in events if isinstance(e, Request)] == [1, 2]
    assert written(pair.connector) == [End(3, "refused", "2 requests in flight already")]


def test_broker_opens_no_more_than_its_stream_limit() -> None:
    pair = Pair(Limits(max_streams=2))
    pair.broker.open("GET", "/", "", [], b"")
    pair.broker.open("GET", "/", "", [], b"")
    assert not pair.broker.can_open
    with pytest.raises(ProtocolError):
        pair.broker.open("GET", "/", "", [], b"")


# --- sequencing, acknowledgement, resume ----------------------------------------------


def test_each_write_acknowledges_what_arrived() -> None:
    pair = Pair()
    pair.request()
    assert pair.broker.unacked == 1
    assert pair.connector.ack_owed == 1
    [batch] = frames_of(pair.connector.data_to_send())  # a bare acknowledgement
    assert batch == Batch(0, 1)
    pair.uplink.feed(raw(batch))
    assert pair.broker.unacked == 0


def test_a_lost_poll_loses_nothing_and_duplicates_nothing() -> None:
    pair = Pair()
    first = pair.broker.open("POST", "/a", "", [], b"1")
    second = pair.broker.open("POST", "/b", "", [], b"2")
    data = pair.broker.data_to_send()
    cut = len(raw(Batch(0, 0), Request(first, "POST", "/a", "", [], b"1", None))) + 3
    assert [e.id for e in pair.poll.feed(data[:cut])] == [first]  # type: ignore[attr-defined]
    # The poll is lost mid-frame. A new one: the connector says what it has.
    pair.poll = pair.connector.inbound()
    pair.broker.acknowledge(pair.connector.received)
    pair.broker.rewind()
    assert [e.id for e in pair.to_connector()] == [second]  # type: ignore[attr-defined]


def test_resent_frames_already_received_are_dropped() -> None:
    pair = Pair()
    request_id = pair.request()
    pair.connector.send_head(request_id, 200, [])
    pair.connector.send_chunk(request_id, b"a")
    data = pair.connector.data_to_send()
    assert len(pair.uplink.feed(data)) == 2
    # The uplink died before the broker's ack came back: the connector sends all again.
    pair.connector.rewind()
    pair.connector.send_chunk(request_id, b"b")
    pair.uplink = pair.broker.inbound()
    assert pair.to_broker() == [Chunk(request_id, b"b")]


def test_an_ack_that_arrives_after_a_rewind_spares_those_frames() -> None:
    pair = Pair()
    pair.broker.models(["a"])
    pair.broker.models(["b"])
    pair.broker.data_to_send()
    pair.broker.rewind()
    pair.uplink.feed(raw(Batch(0, 1)))
    frames = frames_of(pair.broker.data_to_send())
    assert frames == [Batch(1, 0), Models(["b"])]


def test_rewind_with_nothing_unacknowledged_still_writes_a_first_batch() -> None:
    pair = Pair()
    pair.broker.rewind()
    assert frames_of(pair.broker.data_to_send()) == [Batch(0, 0)]


def test_a_keepalive_is_a_bare_batch() -> None:
    pair = Pair()
    assert pair.broker.data_to_send() == b""
    assert frames_of(pair.broker.data_to_send(force=True)) == [Batch(0, 0)]


def test_a_gap_in_numbering_is_a_violation() -> None:
    pair = Pair()
    with pytest.raises(ProtocolError, match=r"frames 0\.\.4 skipped"):
        pair.uplink.feed(raw(Batch(5, 0), Pong(0.0)))


def test_acknowledging_frames_never_sent_is_a_violation() -> None:
    pair = Pair()
    with pytest.raises(ProtocolError, match="acknowledges 3 frames of 0 sent"):
        pair.uplink.feed(raw(Batch(0, 3)))


def test_two_connections_at_once_deliver_each_frame_once() -> None:
    pair = Pair()
    request_id = pair.streaming()
    pair.connector.send_chunk(request_id, b"a")
    old = pair.connector.data_to_send()
    pair.connector.rewind()
    pair.connector.send_chunk(request_id, b"b")
    new = pair.connector.data_to_send()
    second = pair.broker.inbound()
    assert second.feed(new) == [Chunk(request_id, b"a"), Chunk(request_id, b"b")]
    assert pair.uplink.feed(old) == []  # the old connection's late bytes: duplicates
