"""wire: every frame kind round-trips; the decoder survives any slicing and rejects any garbage."""

import itertools
import tracemalloc
import typing

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wire import (
    MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
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
    FrameDecoder,
    FrameError,
    Head,
    Hello,
    Models,
    Ping,
    Pong,
    Request,
    Slots,
    Welcome,
    encode,
    encode_many,
)

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LATIN1 = bytes(range(256)).decode("latin-1")
ERROR_KINDS: tuple[str, ...] = typing.get_args(ErrorKind)

EXAMPLES: list[Frame] = [
    Hello("conn-1", "0.1.0", ["llama3", "mistral"]),
    Hello("conn-2", "9.9", [], protocol=7),
    Welcome("session-abc", 15.0),
    Request(1, "POST", "/v1/chat/completions", "a=1&b=2", [("content-type", "application/json")], b'{"x":1}'),
    Request(2**63, "GET", "/v1/models", "", [], b"", llm_api_key="sk-llm-1"),
    Head(3, 200, [("content-type", "text/event-stream"), ("x-raw", LATIN1)]),
    Chunk(4, b"data: {}\n\n"),
    Chunk(5, b""),
    End(6),
    End(7, "llm_failed", "connection reset"),
    Cancel(8),
    Ping(1712345678.25),
    Drain("shutting down"),
    Models(["a", "b", "c"]),
    Models([]),
    Credit(9, 262_144),
    Pong(0.0),
    Pong(1712345678.5),
    Batch(0, 0),
    Batch(2**40, 17),
    Body(10, b"upload part", True),
    Body(10, b"", False),
    Request(11, "POST", "/v1/audio/transcriptions", "", [], b"", more_body=True),
    Welcome("credential", 15.0, 30.0),
    Welcome("credential", 15.0, 30.0, "b-1"),
    Brokers([("b-1", "https://b1.example"), ("b-2", "")]),
    Capacity(8),
    Capacity(0),
    Slots(3),
    End(12, "busy", "at max_concurrent (8) over all brokers"),
]


def decode_all(data: bytes, decoder: FrameDecoder | None = None) -> list[Frame]:
    decoder = decoder or FrameDecoder()
    frames = decoder.feed(data)
    assert decoder.pending == 0
    return frames


def prefixed(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


# --- unit tests -------------------------------------------------------------------------------------


def test_examples_cover_every_frame_kind() -> None:
    assert {type(f) for f in EXAMPLES} == set(typing.get_args(Frame))


@pytest.mark.parametrize("frame", EXAMPLES, ids=lambda f: type(f).__name__)
def test_each_frame_round_trips(frame: Frame) -> None:
    data = encode(frame)
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert encode_many([frame]) == data
    (decoded,) = decode_all(data)
    assert type(decoded) is type(frame)
    assert decoded == frame


def test_defaults_survive() -> None:
    (hello,) = decode_all(encode(Hello("c", "v", [])))
    assert isinstance(hello, Hello)
    assert hello.protocol == PROTOCOL_VERSION
    (end,) = decode_all(encode(End(9)))
    assert isinstance(end, End)
    assert (end.error, end.detail) == (None, "")
    (req,) = decode_all(encode(Request(1, "GET", "/", "", [], b"")))
    assert isinstance(req, Request)
    assert req.llm_api_key is None


def test_batch_decodes_in_order() -> None:
    data = encode_many(EXAMPLES)
    assert data == b"".join(encode(f) for f in EXAMPLES)
    assert decode_all(data) == EXAMPLES


def test_encode_many_of_nothing_is_empty() -> None:
    assert encode_many([]) == b""
    assert FrameDecoder().feed(b"") == []


def test_batch_fed_byte_by_byte() -> None:
    data = encode_many(EXAMPLES)
    decoder = FrameDecoder()
    out: list[Frame] = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    assert out == EXAMPLES
    assert decoder.pending == 0


def test_latin1_header_bytes_survive() -> None:
    raw = bytes(range(256))
    value = raw.decode("latin-1")
    name = bytes(range(0x80, 0x100)).decode("latin-1")
    (head,) = decode_all(encode(Head(1, 200, [(name, value), ("k", "\x00\xff")])))
    assert isinstance(head, Head)
    assert head.headers[0][1].encode("latin-1") == raw
    assert head.headers[0][0].encode("latin-1") == bytes(range(0x80, 0x100))
    assert head.headers[1] == ("k", "\x00\xff")


def test_binary_body_survives() -> None:
    body = bytes(range(256)) * 10
    (req,) = decode_all(encode(Request(1, "POST", "/", "", [], body)))
    assert isinstance(req, Request)
    assert req.body == body


def test_pending_reports_a_truncated_tail() -> None:
    data = encode(Chunk(1, b"hello world"))
    decoder = FrameDecoder()
    assert decoder.pending == 0
    assert decoder.feed(data[:2]) == []  # inside the prefix
    assert decoder.pending == 2
    assert decoder.feed(data[2:-1]) == []  # inside the body
    assert decoder.pending == len(data) - 1
    assert decoder.feed(data[-1:]) == [Chunk(1, b"hello world")]
    assert decoder.pending == 0


def test_pending_after_whole_frames_and_a_partial_one() -> None:
    whole = encode_many([Cancel(1), Cancel(2)])
    partial = encode(Chunk(3, b"xyz"))[:-2]
    decoder = FrameDecoder()
    assert decoder.feed(whole + partial) == [Cancel(1), Cancel(2)]
    assert decoder.pending == len(partial)


def test_large_stream_with_buffer_compaction() -> None:
    """Frames big enough that the decoder compacts its buffer mid-stream."""
    frames: list[Frame] = [Chunk(i, bytes([i]) * (30_000 + i)) for i in range(12)]
    data = encode_many(frames)
    decoder = FrameDecoder()
    out: list[Frame] = []
    for start in range(0, len(data), 7_001):
        out += decoder.feed(data[start : start + 7_001])
        assert decoder.pending < 40_000
    assert out == frames
    assert decoder.pending == 0


# --- limits and errors ------------------------------------------------------------------------------


def test_frame_at_the_limit_is_accepted() -> None:
    frame = Chunk(1, b"x" * 100)
    size = len(encode(frame)) - 4
    decoder = FrameDecoder(max_frame_size=size)
    assert decoder.feed(encode(frame)) == [frame]


def test_frame_over_the_limit_raises_on_the_prefix_alone() -> None:
    frame = Chunk(1, b"x" * 100)
    size = len(encode(frame)) - 4
    decoder = FrameDecoder(max_frame_size=size - 1)
    with pytest.raises(FrameError, match="exceeds"):
        decoder.feed((size).to_bytes(4, "big"))  # no body bytes at all


def test_huge_prefix_raises_at_once_without_allocating() -> None:
    decoder = FrameDecoder()
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match="exceeds"):
            decoder.feed(b"\xff\xff\xff\xff")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_huge_prefix_fed_byte_by_byte_raises_on_the_fourth() -> None:
    decoder = FrameDecoder()
    for byte in b"\xff\xff\xff":
        assert decoder.feed(bytes([byte])) == []
    with pytest.raises(FrameError):
        decoder.feed(b"\xff")


def test_default_limit() -> None:
    assert FrameDecoder().feed(MAX_FRAME_SIZE.to_bytes(4, "big")) == []  # allowed: waits for the body
    with pytest.raises(FrameError):
        FrameDecoder().feed((MAX_FRAME_SIZE + 1).to_bytes(4, "big"))


def test_oversize_frame_after_valid_ones_in_separate_feeds() -> None:
    decoder = FrameDecoder(max_frame_size=1000)
    assert decoder.feed(encode(Cancel(1))) == [Cancel(1)]
    with pytest.raises(FrameError):
        decoder.feed((1001).to_bytes(4, "big"))


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # zero-length frame
        b"\xc1",  # a byte msgpack never uses
        b"\x93\x05\x01",  # array of 3, truncated
        msgspec.msgpack.encode([5, 1, b"x"]) + b"\x00",  # trailing byte inside the frame
        msgspec.msgpack.encode({"k": 5, "id": 1}),  # a map, frames are arrays
        msgspec.msgpack.encode([5, "not-an-int", b"x"]),  # wrong field type
        msgspec.msgpack.encode([5, 1]),  # missing field
        msgspec.msgpack.encode([6, 1, "no-such-error", ""]),  # not an ErrorKind
        msgspec.msgpack.encode([8, "soon"]),  # Ping.sent not a number
        msgspec.msgpack.encode([4, 1, 200, [["only-a-name"]]]),  # header not a pair
        msgspec.msgpack.encode([3, 1.5, "GET", "/", "", [], b""]),  # float id
    ],
)
def test_undecodable_payload_raises(payload: bytes) -> None:
    with pytest.raises(FrameError):
        FrameDecoder().feed(prefixed(payload))


@pytest.mark.parametrize("tag", [0, 13, 99, -1, "Chunk"])
def test_unknown_tag_raises(tag: object) -> None:
    with pytest.raises(FrameError):
        FrameDecoder().feed(prefixed(msgspec.msgpack.encode([tag, 1, b"x"])))


@pytest.mark.parametrize(
    "payload",
    [
        b"\x92\x09\xa2\xff\xfe",  # Drain(reason=<2 bytes of invalid UTF-8>)
        b"\x94\x04\x01\xcc\xc8\x91\x92\xa1\x80\xa0",  # Head(1, 200, [("\x80" as raw UTF-8, "")])
        b"\x94\x01\xa1\xc3\xa1v\x90",  # Hello(connector_id=<truncated UTF-8>, "v", [])
    ],
    ids=["drain-reason", "header-name", "hello-id"],
)
def test_invalid_utf8_string_raises_frame_error(payload: bytes) -> None:
    with pytest.raises(FrameError):
        FrameDecoder().feed(prefixed(payload))


def test_frame_error_is_a_value_error() -> None:
    assert issubclass(FrameError, ValueError)


def test_valid_frames_before_garbage_in_one_slice_are_not_lost() -> None:
    decoder = FrameDecoder()
    got: list[Frame] = []
    try:
        got += decoder.feed(encode_many([End(1), End(2)]) + prefixed(b"\xc1"))
    except FrameError:
        pass
    else:  # the frames came back first; the error must surface on the next call
        with pytest.raises(FrameError):
            decoder.feed(b"")
    assert got == [End(1), End(2)]


# --- property tests ---------------------------------------------------------------------------------

ids = st.integers(min_value=-(2**63), max_value=2**64 - 1)
any_text = st.text() | st.text(alphabet=st.characters(max_codepoint=255))
headers = st.lists(st.tuples(any_text, any_text), max_size=6)
names = st.lists(any_text, max_size=5)
numbers = st.floats(allow_nan=False)

frame_strategy: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Hello, any_text, any_text, names, ids),
    st.builds(Welcome, any_text, numbers),
    st.builds(Request, ids, any_text, any_text, any_text, headers, st.binary(), st.none() | any_text),
    st.builds(Head, ids, ids, headers),
    st.builds(Chunk, ids, st.binary(max_size=2000)),
    st.builds(End, ids, st.sampled_from((None, *ERROR_KINDS)), any_text),
    st.builds(Cancel, ids),
    st.builds(Ping, numbers),
    st.builds(Drain, any_text),
    st.builds(Models, names),
    st.builds(Credit, ids, ids),
    st.builds(Pong, numbers),
)
frame_lists = st.lists(frame_strategy, max_size=12)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def feed_all(decoder: FrameDecoder, slices: list[bytes]) -> list[Frame]:
    out: list[Frame] = []
    for piece in slices:
        out += decoder.feed(piece)
    return out


@PROPERTY
@given(frames=frame_lists, cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_property_any_slicing_yields_the_same_frames(frames: list[Frame], cuts: list[int]) -> None:
    data = encode_many(frames)
    decoder = FrameDecoder()
    out = feed_all(decoder, split(data, cuts))
    assert out == frames
    assert [type(f) for f in out] == [type(f) for f in frames]
    assert decoder.pending == 0


@PROPERTY
@given(frames=frame_lists, cut=st.integers(min_value=0))
def test_property_truncated_stream_leaves_pending(frames: list[Frame], cut: int) -> None:
    data = encode_many(frames)
    if not data:
        return
    cut = cut % len(data)
    decoder = FrameDecoder()
    out = decoder.feed(data[:cut])
    assert out == frames[: len(out)]
    consumed = len(encode_many(out))
    assert decoder.pending == cut - consumed
    assert out + decoder.feed(data[cut:]) == frames


# The only exception a bad stream may raise.
REJECTED = (FrameError,)


def _only_frame_errors(decoder: FrameDecoder, slices: list[bytes]) -> list[Frame]:
    out: list[Frame] = []
    try:
        for piece in slices:
            out += decoder.feed(piece)
    except REJECTED:
        pass
    return out


@PROPERTY
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_property_random_bytes_decode_or_raise_frame_error(data: bytes, cuts: list[int]) -> None:
    out = _only_frame_errors(FrameDecoder(), split(data, cuts))
    assert all(isinstance(f, typing.get_args(Frame)) for f in out)


@PROPERTY
@given(
    payloads=st.lists(
        st.one_of(
            st.binary(max_size=60),
            # msgpack array header + a plausible tag + random fields: gets past the first checks
            st.tuples(st.integers(0x90, 0x9F), st.integers(0, 14), st.binary(max_size=60)).map(
                lambda t: bytes([t[0], t[1]]) + t[2]
            ),
        ),
        max_size=6,
    ),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
)
def test_property_random_framed_payloads_decode_or_raise_frame_error(payloads: list[bytes], cuts: list[int]) -> None:
    data = b"".join(prefixed(p) for p in payloads)
    out = _only_frame_errors(FrameDecoder(max_frame_size=1000), split(data, cuts))
    assert all(isinstance(f, typing.get_args(Frame)) for f in out)


@PROPERTY
@given(frames=frame_lists, index=st.integers(min_value=0), flip=st.integers(1, 255), cuts=st.lists(st.integers(0)))
def test_property_corrupted_stream_decodes_or_raises_frame_error(
    frames: list[Frame], index: int, flip: int, cuts: list[int]
) -> None:
    data = bytearray(encode_many(frames))
    if data:
        data[index % len(data)] ^= flip
    out = _only_frame_errors(FrameDecoder(), split(bytes(data), cuts))
    assert all(isinstance(f, typing.get_args(Frame)) for f in out)


@PROPERTY
@given(
    frames=frame_lists,
    garbage=st.binary(min_size=1, max_size=200),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
    garbage_cuts=st.lists(st.integers(min_value=0), max_size=5),
)
def test_property_valid_stream_then_garbage(
    frames: list[Frame], garbage: bytes, cuts: list[int], garbage_cuts: list[int]
) -> None:
    decoder = FrameDecoder()
    out = feed_all(decoder, split(encode_many(frames), cuts))
    assert out == frames
    assert decoder.pending == 0
    try:
        for piece in split(garbage, garbage_cuts):
            out += decoder.feed(piece)
    except REJECTED:
        pass  # rejected
    # else: waiting for more bytes (or the garbage happened to be frames); either way the
    # valid frames came first and unchanged
    assert out[: len(frames)] == frames
