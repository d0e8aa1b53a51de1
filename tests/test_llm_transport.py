"""The connector's transport to its LLM: the chunked coding; idle connections reused, bounded, expiring.

In-process over real sockets: the fake LLM counts the connections it accepts, and the
pool's clock is a counter the test moves, so expiry is driven by events, not by waiting.
"""

import asyncio

import h11
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector.llm_transport import MAX_CHUNK_LINE, READ_SIZE, Dechunker, LLMTransport, Origin
from fakellm.server import serve

BODY = msgspec.json.encode({"model": "m1", "messages": [], "stream": True, "fake": {"chunks": 3}})
HEADERS = [(b"host", b"llm"), (b"content-type", b"application/json")]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _burst(transport: LLMTransport, origin: Origin, n: int) -> None:
    """n streamed requests at once, each read to its end (so its connection goes idle)."""

    async def one() -> None:
        response = await transport.send(origin, "POST", b"/v1/chat/completions", HEADERS, BODY)
        assert response.status_code == 200
        body = b"".join([piece async for piece in response.stream])  # type: ignore[union-attr]
        assert body.endswith(b"data: [DONE]\n\n")
        await response.aclose()

    async with asyncio.timeout(30):
        await asyncio.gather(*(one() for _ in range(n)))


@pytest.mark.parametrize("limit", [8, 200])
def test_a_burst_reuses_the_previous_bursts_connections_up_to_the_bound(limit: int) -> None:
    async def main() -> None:
        _server, llm = await serve("127.0.0.1", 0, models=["m1"])
        transport = LLMTransport(max_idle=limit)
        origin: Origin = ("http", "127.0.0.1", int(llm.url.rsplit(":", 1)[1]))
        try:
            await _burst(transport, origin, 100)
            assert llm.connections == 100
            await _burst(transport, origin, 100)
            assert llm.connections == 100 + (100 - min(limit, 100))  # only those not kept are new
        finally:
            await transport.aclose()
            await llm.close()

    asyncio.run(main())


def test_idle_connections_expire_and_are_not_reused() -> None:
    async def main() -> None:
        _server, llm = await serve("127.0.0.1", 0, models=["m1"])
        clock = Clock()
        transport = LLMTransport(idle_expiry=4.0, clock=clock)
        origin: Origin = ("http", "127.0.0.1", int(llm.url.rsplit(":", 1)[1]))
        try:
            await _burst(transport, origin, 10)
            pool = transport._idle[origin]
            assert len(pool) == 10
            clock.now += 3.9
            await _burst(transport, origin, 5)  # fresh enough: reused, and idle again from 1003.9
            assert llm.connections == 10
            clock.now += 3.9  # the five left untouched are now 7.8 s idle: closed when next used
            await _burst(transport, origin, 7)
            assert llm.connections == 12  # 5 reused, 2 new
            assert len(pool) == 7
            clock.now += 4.0
            pool.sweep()
            assert len(pool) == 0
        finally:
            await transport.aclose()
            await llm.close()

    asyncio.run(main())


@pytest.mark.parametrize("stream", [False, True])
def test_a_large_body_is_read_whole_a_bounded_piece_at_a_time(stream: bool) -> None:
    """A 1 MB answer, with a length or chunked: every byte arrives, in pieces of READ_SIZE at
    most (a socket read can bring more: held back, reading paused, not handed on at once)."""

    async def main() -> None:
        _server, llm = await serve("127.0.0.1", 0, models=["m1"])
        transport = LLMTransport()
        origin: Origin = ("http", "127.0.0.1", int(llm.url.rsplit(":", 1)[1]))
        knobs = {"model": "m1", "messages": [], "stream": stream, "fake": {"bytes": 1_000_000}}
        try:
            async with asyncio.timeout(30):  # (reading that never resumes would hang here)
                response = await transport.send(
                    origin, "POST", b"/v1/chat/completions", HEADERS, msgspec.json.encode(knobs)
                )
                pieces = [piece async for piece in response.stream]  # type: ignore[union-attr]
                await response.aclose()
        finally:
            await transport.aclose()
            await llm.close()
        body = b"".join(pieces)
        assert len(body) > 1_000_000 and max(map(len, pieces)) <= READ_SIZE
        assert (
            body.endswith(b"data: [DONE]\n\n") if stream else msgspec.json.decode(body)["object"] == "chat.completion"
        )

    asyncio.run(main())


# --- the chunked transfer coding, sans-IO: feed bytes, assert the body's data --------------


def dechunk(*pieces: bytes) -> tuple[bytes, Dechunker]:
    body, out = Dechunker(), b""
    for piece in pieces:
        body.feed(piece)
        out += body.take()
    return out, body


def test_chunks_in_one_read_come_out_as_one_piece() -> None:
    body = Dechunker(b"4\r\nabcd\r\n3;ext=1\r\nefg\r\n0\r\n\r\n")
    assert body.take() == b"abcdefg"
    assert body.done and not body.leftover


def test_a_body_fed_a_byte_at_a_time() -> None:
    raw = b"a\r\n0123456789\r\n1\r\nx\r\n0\r\nTrailer: yes\r\n\r\n"
    out, body = dechunk(*(raw[i : i + 1] for i in range(len(raw))))
    assert out == b"0123456789x" and body.done


def test_data_of_a_chunk_is_given_as_it_arrives() -> None:
    body = Dechunker(b"10\r\n0123")
    assert body.take() == b"0123"
    assert body.take() == b""
    body.feed(b"456789abcdef\r\n")
    assert body.take() == b"456789abcdef" and not body.done


def test_bytes_past_the_end_are_left_over() -> None:
    body = Dechunker(b"0\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert body.take() == b"" and body.done and body.leftover


_SIZE_LINES = [b"%x", b"%X", b"%08x", b"%x;name=value", b"%x ; x"]


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"zz\r\n", "invalid chunk size"),
        (b"\r\n", "invalid chunk size"),
        (b"-1\r\n", "invalid chunk size"),
        (b"1" * 17 + b"\r\n", "invalid chunk size"),
        (b"2\r\nabc\r\n", "chunk data longer than its size"),
        (b"1" * (MAX_CHUNK_LINE + 1), "chunk size line too long"),
    ],
)
def test_bad_framing_raises(raw: bytes, error: str) -> None:
    with pytest.raises(h11.RemoteProtocolError, match=error):
        dechunk(raw)


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=40), st.sampled_from(_SIZE_LINES)), max_size=8), st.data())
def test_any_split_of_any_chunking_gives_the_body(chunks: list[tuple[bytes, bytes]], data: st.DataObject) -> None:
    """Whole chunks take a short way, the rest a long one: each with any size line, cut anywhere."""
    raw = b"".join(line % len(c) + b"\r\n" + c + b"\r\n" for c, line in chunks) + b"0\r\n\r\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=10)))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    out, body = dechunk(*pieces)
    assert out == b"".join(c for c, _ in chunks) and body.done and not body.leftover
