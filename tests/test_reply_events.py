"""A reply relayed in process: its events in order, chunks to the relay's sink while it waits, one write per turn."""

import asyncio

from broker.asgi import Message
from broker.relay import _Outcome, _respond
from broker.settings import Settings
from broker.tunnel import Events, Exchange
from tests.test_pacing import Turns
from wire import Chunk, End, Head


def test_chunks_that_come_while_the_relay_waits_go_to_the_sink_and_wake_nobody() -> None:
    async def main() -> None:
        events, taken = Events(), []
        events.deliver_to(lambda chunk: taken.append(chunk.data) is None)
        relay = asyncio.ensure_future(events.get())
        await asyncio.sleep(0)  # the relay waits
        events.put_nowait(Chunk(1, b"a"))
        events.put_nowait(Chunk(1, b"b"))
        await asyncio.sleep(0)
        assert taken == [b"a", b"b"] and not relay.done()
        events.put_nowait(End(1))  # not a chunk: the relay's own
        assert await asyncio.wait_for(relay, 5) == End(1)

    asyncio.run(main())


def test_a_chunk_the_sink_declines_wakes_the_relay_and_what_follows_queues_behind_it() -> None:
    async def main() -> None:
        events, taken = Events(), []
        events.deliver_to(lambda chunk: chunk.data != b"slow" and taken.append(chunk.data) is None)
        relay = asyncio.ensure_future(events.get())
        await asyncio.sleep(0)
        events.put_nowait(Chunk(1, b"slow"))  # (the user's connection is full, say)
        events.put_nowait(Chunk(1, b"next"))  # the relay is awake, not waiting: in order, behind it
        assert await asyncio.wait_for(relay, 5) == Chunk(1, b"slow")
        assert events.get_nowait() == Chunk(1, b"next") and events.empty() and taken == []

    asyncio.run(main())


def test_while_the_relay_is_busy_every_event_is_queued_in_order_sink_or_not() -> None:
    async def main() -> None:
        events = Events()
        relay = asyncio.ensure_future(events.get())
        await asyncio.sleep(0)
        for data in (b"a", b"b"):
            events.put_nowait(Chunk(1, data))
        assert await asyncio.wait_for(relay, 5) == Chunk(1, b"a")
        events.deliver_to(lambda chunk: True)  # the relay is busy: nothing may overtake b"b"
        events.put_nowait(Chunk(1, b"c"))
        assert [events.get_nowait(), events.get_nowait()] == [Chunk(1, b"b"), Chunk(1, b"c")]

    asyncio.run(main())


def test_a_sink_that_fails_leaves_the_chunk_to_the_relay() -> None:
    """The sink runs in the uplink's dispatch: a bug in it must not lose the chunk, nor
    reach the other frames of the same read."""

    def broken(chunk: Chunk) -> bool:
        raise ValueError("a bug")

    async def main() -> None:
        events = Events()
        events.deliver_to(broken)
        relay = asyncio.ensure_future(events.get())
        await asyncio.sleep(0)
        events.put_nowait(Chunk(1, b"a"))
        assert await asyncio.wait_for(relay, 5) == Chunk(1, b"a")

    asyncio.run(main())


class _Session:
    """What an Exchange asks of its session while a reply is relayed: the credit it returns."""

    def consumed(self, request_id: int, size: int) -> None:
        pass


def test_a_head_leaves_in_the_turn_that_relays_what_came_with_it() -> None:
    """The user's connection gathers one loop turn's writes into one: a whole reply that
    came in one uplink read (its head, body and End) is sent in a single turn, so it leaves
    in one write rather than a head alone and then the rest."""

    async def main() -> list[tuple[str, int]]:
        exchange, turns, sent = Exchange(_Session(), 1), Turns(), []  # type: ignore[arg-type]
        for event in (Head(1, 200, [("content-type", "application/json")]), Chunk(1, b"{}"), End(1)):
            exchange.events.put_nowait(event)

        async def send(message: Message) -> None:
            sent.append((message["type"], turns.now))

        out = _Outcome("r1", "openai")
        async with asyncio.timeout(10):
            assert await _respond(exchange, send, None, Settings(), out) is None
        turns.stop()
        assert out.head_sent and out.ended and out.bytes == 2
        return sent

    sent = asyncio.run(main())
    assert [kind for kind, _ in sent] == ["http.response.start", "http.response.body"]
    assert len({turn for _, turn in sent}) == 1, sent
